"""Encrypted backup to untrusted peers (extension ``untrusted``, ``protocol/untrusted.md``).

Pure: the keys trusted peers derive, the blob and metadata formats
(``sealing.py``) and the signed manifest with its rollback rule
(``manifest.py``).  No I/O, no reactor.
"""
