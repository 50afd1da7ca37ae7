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
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from room_ledger import events as ev

log = logging.getLogger("bridge.payloads")


def default_dir() -> Path:
    return Path(tempfile.gettempdir()) / "room-ledger-payloads"


class Upload(Protocol):
    """A payload put into the bucket as it arrives (:class:`room_ledger.client.ObjectUpload`)."""

    failed: str

    def feed(self, data: bytes) -> None: ...
    async def finish(self, sha256: str) -> object: ...
    def abort(self) -> None: ...


class SpoolWriter:
    """One payload being written: ``write`` chunks, then ``finish`` (or ``abort``).

    With an uploader (the bridge's), the chunks also go to the bucket as they arrive; the file
    stays until the event is stored, for a retry should that upload fail.
    """

    def __init__(self, spool: PayloadSpool, name: str, *, upload: bool = False) -> None:
        self.spool = spool
        self.name = name
        self.upload: Upload | None = None
        if upload and spool.uploader is not None:
            try:
                self.upload = spool.uploader(name)
            except Exception as exc:  # not connected: the writer puts the file once it can
                log.info("no upload while the payload arrives (%s); the writer puts its file", type(exc).__name__)
        self.size = 0
        self._sha = hashlib.sha256()
        self._final = spool.path(name)
        self._final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._final.parent, prefix=".part-")
        self._tmp = Path(tmp)
        # A large buffer: stream chunks (15,000 bytes) reach the disk in few writes.
        self._file: IO[bytes] | None = os.fdopen(fd, "wb", buffering=1024 * 1024)

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)
        if self.upload is not None:
            self.upload.feed(data)

    def finish(self, form: ev.PayloadForm = "") -> ev.PayloadRef:
        """Close the file under its final name; the reference the event will carry."""
        assert self._file is not None
        self._file.close()
        self._file = None
        os.replace(self._tmp, self._final)
        return ev.PayloadRef(name=self.name, size=self.size, sha256=self._sha.hexdigest(), form=form)

    async def stored(self) -> bool:
        """After ``finish``: wait for the upload of the bytes as they arrived; True when the object
        is in the bucket (else the writer puts the file)."""
        if self.upload is None:
            return False
        try:
            await self.upload.finish(self._sha.hexdigest())
            self.spool.stored.add(self.name)
        except Exception as exc:  # NATS away: the file is put again by the writer
            log.info("a payload's upload while arriving failed (%s); the writer puts its file again",
                     type(exc).__name__)
            return False
        return True

    def abort(self) -> None:
        if self.upload is not None:
            self.upload.abort()
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

    def __init__(self, directory: Path | None = None, *,
                 uploader: Callable[[str], Upload] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_dir()
        #: Starts an upload per spooled stream (the bridge's writer sets it; None: files only).
        self.uploader = uploader
        #: Names this process saw stored whole by their upload (the writer need not ask).
        self.stored: set[str] = set()

    def path(self, name: str) -> Path:
        return self.directory / f"{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()}.bin"

    def writer(self, name: str, *, upload: bool = False) -> SpoolWriter:
        """A file for ``name``; with ``upload`` (and an uploader) its bytes also go to the bucket
        as they are written (then ``await writer.stored()``)."""
        return SpoolWriter(self, name, upload=upload)

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
        self.stored.discard(name)
        with contextlib.suppress(OSError):
            self.path(name).unlink()
