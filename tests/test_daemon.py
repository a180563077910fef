"""The daemon object without its reactor running: decisions that need no peers."""

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from clearskies.daemon import Daemon, DaemonSettings, PendingJoin
from clearskies.errors import ConfigurationError
from clearskies.threads import SyncRunner


def test_keys_for_an_attach_detached_meanwhile_create_nothing(tmp_path):
    """Keys arriving for an attach no longer pending fail the handshake and write nothing."""
    daemon = Daemon(reactor, DaemonSettings(data_dir=str(tmp_path / "data")))
    join = PendingJoin(bytes(16), str(tmp_path / "copy"), "a" * 32)
    failures = []
    Deferred.fromCoroutine(daemon._join_completed(object(), join)).addErrback(failures.append)
    assert failures and failures[0].check(ConfigurationError)
    assert "cancelled" in failures[0].getErrorMessage()
    assert not (tmp_path / "copy").exists() and daemon.shares == {}


def test_completed_attach_stores_the_share_before_it_forgets_the_join(tmp_path: Path):
    """While the new share is being stored, the pending attach is still on disk:
    a crash at that moment leaves the attach to retry, never nothing at all."""
    daemon = Daemon(Clock(), DaemonSettings(data_dir=str(tmp_path / "data")))
    daemon.cpu_runner = SyncRunner()  # type: ignore[assignment]
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
    assert order[-2:] == ["manual_peers", "pending_joins"]
