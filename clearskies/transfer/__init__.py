"""Moving file content between peers (protocol/transfer.md).

Receiving, bottom to top:

- :mod:`~clearskies.transfer.names`: the hidden temporary name of a partial
  download, and how to recognise one.
- :mod:`~clearskies.transfer.modes`: the permission bits of a read-only
  share's files.
- :mod:`~clearskies.transfer.states`: a download's state machine
  (``RECEIVER_TRANSITIONS``, drawn in ``protocol/receiver.dot``).
- :mod:`~clearskies.transfer.jobs`: one download's disk work in a worker
  thread (verify, fsync, copy, rename, keep a conflict copy).
- :mod:`~clearskies.transfer.seals`: small downloads sealed several at a
  time (``BufferedSeals``).
- :mod:`~clearskies.transfer.receiver`: ``FileReceiver``, one download from
  the first byte to the rename, and ``FinishResult``, how it ended.
- :mod:`~clearskies.transfer.install`: many verified downloads put in place
  in one worker job (``finish_many``).

Sending, bottom to top:

- :mod:`~clearskies.transfer.refusals`: the ``get_error`` answer and a
  reason that names no local path.
- :mod:`~clearskies.transfer.sender`: ``FileSender``, one file streamed as
  a push producer, and ``open_to_send``.
- :mod:`~clearskies.transfer.sendqueue`: ``SendQueue``, everything one
  connection writes, one file at a time with messages in between.

Every public name is importable from this package too.
"""

from __future__ import annotations

from clearskies.transfer.install import finish_many
from clearskies.transfer.jobs import BLOCK_SIZE
from clearskies.transfer.modes import WRITE_BITS, unwritable_mode
from clearskies.transfer.names import TEMP_SUFFIX, is_temp_name, temp_name
from clearskies.transfer.receiver import (
    CONFLICT, CORRUPT, FLUSH_AHEAD, MAX_QUEUED_BATCHES, OK, SMALL_FILE, WRITE_BATCH,
    FileReceiver, FinishResult,
)
from clearskies.transfer.refusals import describe_os_error, get_error_message
from clearskies.transfer.seals import BufferedSeals
from clearskies.transfer.sender import FileSender, OpenedFile, open_to_send
from clearskies.transfer.sendqueue import (
    MAX_QUEUED_FILES, MAX_QUEUED_MESSAGE_BYTES, PREPARE_BYTES, PREPARE_FILES, SendQueue,
    SendResult,
)
from clearskies.transfer.states import (
    RECEIVER_STATES, RECEIVER_TRANSITIONS, IllegalTransition, ReceiverMachine,
)

__all__ = [
    "TEMP_SUFFIX", "temp_name", "is_temp_name", "WRITE_BITS", "unwritable_mode",
    "RECEIVER_STATES", "RECEIVER_TRANSITIONS", "IllegalTransition", "ReceiverMachine",
    "BLOCK_SIZE", "BufferedSeals", "SMALL_FILE", "FLUSH_AHEAD", "WRITE_BATCH",
    "MAX_QUEUED_BATCHES", "OK", "CORRUPT", "CONFLICT", "FinishResult", "FileReceiver",
    "finish_many", "get_error_message", "describe_os_error", "OpenedFile", "open_to_send",
    "FileSender", "MAX_QUEUED_FILES", "MAX_QUEUED_MESSAGE_BYTES", "PREPARE_FILES",
    "PREPARE_BYTES", "SendResult", "SendQueue",
]
