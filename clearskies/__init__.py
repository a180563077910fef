"""ClearSkies: keep a directory identical across machines, peer to peer.

An open-protocol alternative to BitTorrent Sync.  The protocol as this
package speaks it is documented in the ``protocol/`` folder of the source tree.
"""

__version__ = "0.1.0"
SOFTWARE = "clearskies-py " + __version__
