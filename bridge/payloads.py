"""Payloads on their way to the Object Store: one local file per object, until the event is stored.

A payload above the inline limit is written here first (a stream chunk by chunk, as it arrives,
so a 200 MB stream costs one chunk of memory), then :class:`bridge.writer.BridgeWriter` puts the
file into the bucket and appends the event that points at it, and removes the file once the
event is acknowledged. The file outlives a NATS outage and a bridge restart (the spill files of
events point at them), so a retry always has the bytes.

Files live under ``<LEDGER_HOME>/bridge/payloads/``, named by a digest of the object name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO

from ledger import events as ev


def default_dir() -> Path:
    return Path(tempfile.gettempdir()) / "room-ledger-payloads"


class SpoolWriter:
    """One payload being written: ``write`` chunks, then ``finish`` (or ``abort``)."""

    def __init__(self, spool: PayloadSpool, name: str) -> None:
        self.spool = spool
        self.name = name
        self.size = 0
        self._sha = hashlib.sha256()
        self._final = spool.path(name)
        self._final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._final.parent, prefix=".part-")
        self._tmp = Path(tmp)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)

    def finish(self, form: ev.PayloadForm = "") -> ev.PayloadRef:
        """Close the file under its final name; the reference the event will carry."""
        assert self._file is not None
        self._file.close()
        self._file = None
        os.replace(self._tmp, self._final)
        return ev.PayloadRef(name=self.name, size=self.size, sha256=self._sha.hexdigest(), form=form)

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(OSError):
            self._tmp.unlink()

    def read_all(self) -> bytes:
        """The bytes written so far (after ``finish``: the whole payload)."""
        return self._final.read_bytes() if self._file is None else self._tmp.read_bytes()


class PayloadSpool:
    """The directory of payload files waiting for the bucket."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_dir()

    def path(self, name: str) -> Path:
        return self.directory / f"{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()}.bin"

    def writer(self, name: str) -> SpoolWriter:
        return SpoolWriter(self, name)

    def keep(self, name: str, data: bytes, form: ev.PayloadForm = "") -> ev.PayloadRef:
        writer = self.writer(name)
        try:
            writer.write(data)
        except BaseException:
            writer.abort()
            raise
        return writer.finish(form)

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def discard(self, name: str) -> None:
        with contextlib.suppress(OSError):
            self.path(name).unlink()
