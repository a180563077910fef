"""A pending attach (a code we were given) outlives every crash until its share is stored."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from clearskies.daemon import Daemon, DaemonSettings, PendingJoin


def test_completed_attach_stores_the_share_before_it_forgets_the_join(tmp_path: Path):
    """While the new share is being stored, the pending attach is still on disk:
    a crash at that moment leaves the attach to retry, never nothing at all."""
    daemon = Daemon(Clock(), DaemonSettings(data_dir=str(tmp_path / "data")))
    saved: dict[str, Any] = {}
    order: list[str] = []

    def set_config(key: str, value: Any) -> Deferred[None]:
        saved[key] = json.loads(json.dumps(value))
        order.append(key)
        return succeed(None)

    daemon.store = SimpleNamespace(set_config=set_config)  # type: ignore[assignment]
    join = PendingJoin(b"\x01" * 16, str(tmp_path / "share"), "a" * 32, ["127.0.0.1:4000"])
    daemon.joins[join.access_id] = join
    daemon.config["pending_joins"] = [join.to_dict()]
    saved["pending_joins"] = [join.to_dict()]
    stored_while_adding: list[list[dict]] = []
    adding: Deferred[None] = Deferred()

    async def add_share(keys: Any, path: str, peer_id: str) -> None:
        stored_while_adding.append(list(saved["pending_joins"]))
        await adding  # the crash would come here

    daemon._add_share = add_share  # type: ignore[method-assign]
    done = Deferred.fromCoroutine(daemon._join_completed(SimpleNamespace(share_id="f" * 64),
                                                         join))
    assert stored_while_adding == [[join.to_dict()]]
    assert saved["pending_joins"] == [join.to_dict()]
    adding.callback(None)
    assert done.called
    assert saved["pending_joins"] == [] and join.access_id not in daemon.joins
    # The address given with the code became the share's before the join was dropped.
    assert saved["manual_peers"] == {"f" * 64: ["127.0.0.1:4000"]}
    assert order == ["manual_peers", "pending_joins"]
