"""What the load and abuse benchmarks share: run one coroutine on the real reactor,
and print a module's rows (``--json`` for ``bench/abuse.py``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred


def run_on_reactor(reactor: Any, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main()`` on ``reactor`` until it ends; re-raise what it raised."""
    failure: list[Any] = []
    done = Deferred.fromCoroutine(main())
    done.addErrback(failure.append).addBoth(lambda _: reactor.stop())
    reactor.run()
    if failure:
        failure[0].raiseException()


def print_rows(rows: Callable[[], list[Any]]) -> None:
    """The ``__main__`` of an area module: its rows as JSON (``--json``) or one a line."""
    if sys.argv[1:] == ["--json"]:
        print(json.dumps(rows()))
    else:
        for row in rows():
            print(row)
