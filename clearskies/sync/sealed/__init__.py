"""Untrusted peers in a running share (``protocol/untrusted.md``): the untrusted side
(``keeper.py``, ``vault.py``) and the trusted side (``owner.py``, ``restore.py``),
over one connection each (``channel.py``)."""
