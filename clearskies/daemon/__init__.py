"""The daemon: every share, the peer listener, discovery and the control socket.

Rooms: ``service`` (the root ``MultiService`` and its lifecycle), ``shares``
(the share registry, one child service per share), ``runtime`` and
``localshare`` (one share at run time), ``host`` (what a share sees of the
daemon), ``codes`` (access codes and attaches), ``keyring`` (the handshake's
view of our keys), ``listeners`` and ``tor`` (where peers reach us),
``dialling`` (whom we dial, through which transport, and the sessions
connections start), ``known`` (the peers a user gave and the ones we remember),
``discovery`` (every discovery source: known peers, LAN, trackers),
``activity`` (pause and rates), ``options``
(command-line and stored settings), ``startup`` (the data directory's lock, and
saying why a start failed) and ``resources`` (what the rooms share).
"""

from clearskies.daemon.codes import PendingJoin
from clearskies.daemon.options import DaemonSettings
from clearskies.daemon.service import Daemon

__all__ = ["Daemon", "DaemonSettings", "PendingJoin"]
