"""A crash-safe JSON-lines results file: one record per line, appended as soon as it is known.

Writing: each record is one line, written by a single `os.write` of its full bytes (looped only if
the kernel writes less) and then `fsync`ed, under an exclusive `flock`, so concurrent writers never
interleave. A process killed mid-write (even `kill -9`) leaves at most a *torn* final line, one
without its trailing newline: readers ignore it, and the next append first truncates it away.

Reading: a line counts only when it ends with a newline and parses as a JSON object; anything else
is skipped (and counted). Records are identified by `point_id`, a hash of the experiment name, its
canonical config and the seed; an id already in the file is never appended twice, so a resumed
sweep skips what is done and never duplicates it.

This module imports nothing heavy (no JAX), so it is cheap to use from any process.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any, NamedTuple

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: single writer assumed
    fcntl = None


class StoreError(OSError):
    """The results file cannot be opened, written or read; the message names the path."""


def point_id(experiment: str, config: dict[str, Any], seed: int) -> str:
    """16 hex digits of sha256 over the canonical JSON of (experiment, config, seed)."""
    text = json.dumps({"experiment": experiment, "config": config, "seed": int(seed)},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Contents(NamedTuple):
    """What a results file holds: records in file order, unique by id; skipped lines counted."""

    records: list[dict[str, Any]]
    torn_tail: bool       # a final line without its newline (an interrupted write)
    bad_lines: int        # newline-terminated lines that do not parse as a JSON object
    duplicates: int       # records whose id appeared earlier (kept: the first)


def _parse(data: bytes, seen: set[str] | None = None) -> tuple[list[dict], bool, int, int]:
    """Complete lines of `data` as records; the bytes after the last newline are the torn tail."""
    *lines, tail = data.split(b"\n")
    seen = set() if seen is None else seen
    records, bad, duplicates = [], 0, 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            bad += 1
            continue
        if not isinstance(record, dict):
            bad += 1
            continue
        rid = record.get("id")
        if rid is not None:
            if rid in seen:
                duplicates += 1
                continue
            seen.add(rid)
        records.append(record)
    return records, bool(tail), bad, duplicates


def read(path: str | os.PathLike) -> Contents:
    """Every complete, parseable record of the file at `path` (StoreError if it cannot be read)."""
    try:
        data = pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        raise StoreError(errno.ENOENT, f"no results file at {str(path)!r}") from None
    except OSError as error:
        raise StoreError(error.errno, f"cannot read results file {str(path)!r}: "
                                      f"{error.strerror or error}") from None
    records, torn, bad, duplicates = _parse(data)
    return Contents(records, torn, bad, duplicates)


class ResultStore:
    """An open results file: `ids` of finished records, `append(record)` (crash-safe).

    Opening creates the file (and its parent folders) and fails at once, with a StoreError naming
    the path, if it cannot be written, so a sweep never runs work it could not save.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            if self.path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            existed = self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise StoreError(error.errno, f"cannot write results to {str(self.path)!r}: "
                                          f"{error.strerror or error}") from None
        if not existed:
            _fsync_dir(self.path.parent)
        self._offset = 0          # bytes of the file already parsed into _ids
        self._ids: set[str] = set()
        self._records: list[dict[str, Any]] = []
        with self._locked():
            self._refresh()

    # -- reading ---------------------------------------------------------------------------

    @property
    def ids(self) -> set[str]:
        """Ids of the records finished so far (by this or any other writer)."""
        with self._locked():
            self._refresh()
        return set(self._ids)

    def records(self) -> list[dict[str, Any]]:
        with self._locked():
            self._refresh()
        return list(self._records)

    def __contains__(self, rid: str) -> bool:
        return rid in self.ids

    def _refresh(self) -> None:
        """Parse the complete lines written since the last look (by anyone)."""
        size = os.fstat(self._fd).st_size
        if size < self._offset:  # truncated by someone else: start again
            self._offset, self._ids, self._records = 0, set(), []
        data = os.pread(self._fd, size - self._offset, self._offset) if size > self._offset else b""
        complete = data.rfind(b"\n") + 1
        records, _, _, _ = _parse(data[:complete], self._ids)
        self._records.extend(records)
        self._offset += complete

    # -- writing ---------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> bool:
        """Write `record` (a JSON object with an "id") as one line; False if its id is present."""
        rid = record.get("id")
        if not isinstance(rid, str):
            raise TypeError("a record needs a string 'id' (see point_id)")
        line = (json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=True)
                + "\n").encode()
        if b"\n" in line[:-1]:
            raise ValueError("a record must serialise to a single line")
        with self._locked():
            self._repair_tail()
            self._refresh()
            if rid in self._ids:
                return False
            try:
                _write_all(self._fd, line)
                os.fsync(self._fd)
            except OSError as error:
                raise StoreError(error.errno, f"cannot write results to {str(self.path)!r}: "
                                              f"{error.strerror or error}") from None
            self._refresh()
        return True

    def _repair_tail(self) -> None:
        """Truncate a final line without its newline (left by a writer that was killed)."""
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - 65536)
            chunk = os.pread(self._fd, end - start, start)
            at = chunk.rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            end = start
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)

    def _locked(self):
        return _Lock(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records())


class _Lock:
    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: pathlib.Path) -> None:
    """Make a newly created file's directory entry durable (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
