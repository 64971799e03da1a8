"""A crash-safe JSON-lines results file: one record per line, appended as soon as it is known.

Writing: one writer at a time. A `ResultStore` holds an exclusive `flock` on the file from open to
close (the kernel drops it when the process dies, even by `kill -9`); a second store on the same
file, in this process or another, is refused with a StoreError, so two sweeps never both claim the
same points. Each record is one line, written by a single `os.write` of its full bytes (looped only
if the kernel writes less) and then `fsync`ed. A process killed mid-write leaves at most a *torn*
final line, one without its trailing newline.

Opening a store repairs the final line: a complete JSON object that only lacks its newline (a file
cut by hand, an editor) gets the newline back and is kept; anything else (an interrupted write) is
truncated away, and both are said on stderr. A complete record is never deleted.

Reading (`read`, no lock): a line counts as a record only when it ends with a newline and parses as
a JSON object; anything else is skipped (and counted), and a final line that parses but lacks its
newline is returned apart (`Contents.unterminated`). Records are identified by `point_id`, a hash
of the experiment name, its canonical config and the seed; an id already in the file is never
appended twice, so a resumed sweep skips what is done and never duplicates it.

This module imports nothing heavy (no JAX), so it is cheap to use from any process.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from typing_extensions import Self

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one writer is assumed, not enforced
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
    torn_tail: bool       # a final line without its newline that is no JSON object (torn write)
    bad_lines: int        # newline-terminated lines that do not parse as a JSON object
    duplicates: int       # records whose id appeared earlier (kept: the first)
    # A final line that parses as a JSON object but lacks its newline: a complete record that
    # the next writer keeps (see ResultStore), so a report may count it.
    unterminated: dict[str, Any] | None = None


def _object(line: bytes) -> dict[str, Any] | None:
    """The JSON object on `line`, or None if it is not one."""
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _parse(data: bytes, seen: set[str] | None = None) -> tuple[list[dict], bytes, int, int]:
    """Complete lines of `data` as records, and the bytes after the last newline (the tail)."""
    *lines, tail = data.split(b"\n")
    seen = set() if seen is None else seen
    records, bad, duplicates = [], 0, 0
    for line in lines:
        if not line.strip():
            continue
        record = _object(line)
        if record is None:
            bad += 1
            continue
        rid = record.get("id")
        if rid is not None:
            if rid in seen:
                duplicates += 1
                continue
            seen.add(rid)
        records.append(record)
    return records, tail, bad, duplicates


def read(path: str | os.PathLike) -> Contents:
    """Every complete, parseable record of the file at `path` (StoreError if it cannot be read)."""
    try:
        data = pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        raise StoreError(errno.ENOENT, f"no results file at {str(path)!r}") from None
    except OSError as error:
        raise StoreError(error.errno, f"cannot read results file {str(path)!r}: "
                                      f"{error.strerror or error}") from None
    records, tail, bad, duplicates = _parse(data)
    unterminated = _object(tail) if tail.strip() else None
    return Contents(records, bool(tail.strip()) and unterminated is None, bad, duplicates,
                    unterminated)


class ResultStore:
    """An open results file, held by this writer alone: `ids` of finished records, `append(record)`
    (crash-safe), `clear()`.

    Opening creates the file (and its parent folders), takes its lock and repairs its final line
    (see the module docstring); it fails at once, with a StoreError naming the path, if the file
    cannot be written or another writer holds it, so a sweep never runs work it could not save.
    Close it (or use `with`) to release the lock; a process that exits releases it anyway.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._fd = -1
        try:
            if self.path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            existed = self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise StoreError(error.errno, f"cannot write results to {str(self.path)!r}: "
                                          f"{error.strerror or error}") from None
        self._offset = 0          # bytes of the file already parsed into _ids
        self._ids: set[str] = set()
        self._records: list[dict[str, Any]] = []
        try:
            _lock(self._fd, self.path)
            if not existed:
                _fsync_dir(self.path.parent)
            self._repair_tail()
            self._refresh()
        except BaseException:
            self.close()
            raise

    # -- reading ---------------------------------------------------------------------------

    @property
    def ids(self) -> set[str]:
        """Ids of the records finished so far."""
        self._refresh()
        return set(self._ids)

    def records(self) -> list[dict[str, Any]]:
        self._refresh()
        return list(self._records)

    def __contains__(self, rid: str) -> bool:
        return rid in self.ids

    def _refresh(self) -> None:
        """Parse the complete lines written since the last look."""
        size = os.fstat(self._fd).st_size
        if size < self._offset:  # truncated under us (by hand): start again
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
        self._repair_tail()  # only after a failed write of ours, or an edit by hand
        self._refresh()
        if rid in self._ids:
            return False
        self._write(line)
        self._refresh()
        return True

    def clear(self) -> None:
        """Empty the file (a fresh start, under this writer's lock)."""
        try:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
        except OSError as error:
            raise StoreError(error.errno, f"cannot write results to {str(self.path)!r}: "
                                          f"{error.strerror or error}") from None
        self._offset, self._ids, self._records = 0, set(), []

    def _write(self, data: bytes) -> None:
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as error:
            raise StoreError(error.errno, f"cannot write results to {str(self.path)!r}: "
                                          f"{error.strerror or error}") from None

    def _repair_tail(self) -> None:
        """End the final line: add the newline a complete record lacks, or truncate a torn one."""
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        start = _last_line_start(self._fd, size)
        tail = os.pread(self._fd, size - start, start)
        if _object(tail) is not None:
            self._write(b"\n")
            _note(f"{str(self.path)!r}: its final record lacked a newline; added one (the record "
                  f"is kept)")
            return
        os.ftruncate(self._fd, start)
        os.fsync(self._fd)
        if tail.strip():
            _note(f"{str(self.path)!r}: dropped a torn final line ({len(tail)} bytes, not a "
                  f"complete record: a write that was interrupted)")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1

    def __del__(self) -> None:  # a store dropped without close() still frees the file
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records())


def _lock(fd: int, path: pathlib.Path) -> None:
    """Take the file's exclusive lock for this store's lifetime, or refuse at once.

    flock(2) locks belong to an open file description, so a second `ResultStore` on the same
    file is refused in this process as in another; the kernel releases the lock when the
    descriptor is closed or the process dies.
    """
    if fcntl is None:  # pragma: no cover - not POSIX
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StoreError(errno.EWOULDBLOCK, f"results file {str(path)!r} is in use by another "
                         f"writer (a sweep, `run --out` or the demo into the same file, still "
                         f"running); wait for it to finish or write to another file") from None
    except OSError as error:  # e.g. ENOLCK on a file system without locks
        raise StoreError(error.errno, f"cannot lock results file {str(path)!r} for writing: "
                                      f"{error.strerror or error}") from None


def _last_line_start(fd: int, size: int) -> int:
    """Offset just after the last newline before `size` (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - 65536)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


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
