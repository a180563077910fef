"""The daemon object without its reactor running: decisions that need no peers."""

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from clearskies.daemon import Daemon, DaemonSettings, PendingJoin
from clearskies.errors import ConfigurationError


def test_keys_for_an_attach_detached_meanwhile_create_nothing(tmp_path):
    """Keys arriving for an attach no longer pending fail the handshake and write nothing."""
    daemon = Daemon(reactor, DaemonSettings(data_dir=str(tmp_path / "data")))
    join = PendingJoin(bytes(16), str(tmp_path / "copy"), "a" * 32)
    failures = []
    Deferred.fromCoroutine(daemon._join_completed(object(), join)).addErrback(failures.append)
    assert failures and failures[0].check(ConfigurationError)
    assert "cancelled" in failures[0].getErrorMessage()
    assert not (tmp_path / "copy").exists() and daemon.shares == {}
