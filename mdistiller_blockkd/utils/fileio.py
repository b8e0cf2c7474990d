"""Atomic file writes: the one implementation every part of the toolbox uses.

A file is written into a temporary file beside its destination (``.<name>.*.tmp``),
flushed and fsynced, given the usual permissions (:data:`FILE_MODE`) and moved onto the
destination with ``os.replace``; the folder is then fsynced. A process killed while
writing leaves the previous file (if any) untouched and, when the kill reaches Python as
an exception (Ctrl-C; SIGTERM under :func:`~mdistiller_blockkd.errors.run_cli`), no
temporary file behind; :func:`remove_temporaries` deletes those a SIGKILL left. An
``OSError`` while writing (a full disk, a read-only folder...) names the destination,
never the temporary file.

* :func:`atomic_write` -- fill an open temporary file with a callback (text or binary).
* :func:`atomic_write_text` -- write a string (UTF-8).
* :func:`atomic_write_bytes_from` -- let a library write the temporary file by name
  (matplotlib's ``savefig``), keeping the destination's extension.
* :func:`remove_temporaries` -- delete the temporary files a killed process left.
* :func:`name_os_errors` -- give the ``OSError`` of a write (a full disk...) the file's name.
* :func:`read_json_lines` -- the one JSON-lines reader (``metrics.jsonl``).
* :class:`FolderLock` -- an exclusive lock on a run folder that a killed process cannot leave stuck.

This module imports neither torch nor numpy, so the light command-line tools
(the report command) can use it and still start fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from typing import IO, Callable, List, Optional

from ..errors import ConfigError, UserError

__all__ = ["FILE_MODE", "fsync_dir", "atomic_write", "atomic_write_text", "atomic_write_bytes_from", "name_os_errors",
           "read_json_lines", "remove_temporaries", "check_output_path", "FolderLock"]


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Mode of files written through a temporary file (``mkstemp`` creates them 0600).
FILE_MODE = 0o666 & ~_current_umask()


def fsync_dir(folder: str) -> None:
    """fsync a folder so a rename inside it survives a crash (ignored where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _replace_with_temporary(path, fill: Callable[[int, str], None], suffix: str = ".tmp") -> None:
    """Create a temporary file beside ``path``, let ``fill(fd, tmp_path)`` write it (and
    close ``fd``), then give it :data:`FILE_MODE` and move it onto ``path``; on any
    error the temporary file is removed and the error raised again."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    try:
        fill(fd, tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


#: Names of the temporary files :func:`_replace_with_temporary` creates (``.<name>.<8 random>.tmp[.<ext>]``).
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]*)?$")


def remove_temporaries(folder) -> List[str]:
    """Delete the temporary files of atomic writes that a killed process left in ``folder``; return their names.

    Call it only while no other process writes to ``folder`` (e.g. under its :class:`FolderLock`).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    gone = sorted(n for n in os.listdir(folder) if _TEMPORARY.match(n) and os.path.isfile(os.path.join(folder, n)))
    for name in gone:
        os.remove(os.path.join(folder, name))
    return gone


@contextlib.contextmanager
def name_os_errors(path):
    """Context manager: re-raise an ``OSError`` that names no file, or only ``path``'s temporary
    file, as one naming ``path`` (a ``write`` on a full disk names no file: the user must learn
    which file could not be written)."""
    try:
        yield
    except OSError as e:
        path = os.fspath(path)
        named = e.filename2 if e.filename2 is not None else e.filename
        temporary = named is not None and os.path.basename(os.fsdecode(named)).startswith(f".{os.path.basename(path)}.")
        if e.errno is None or (named is not None and not temporary):
            raise
        raise OSError(e.errno, os.strerror(e.errno), path) from e


def atomic_write(path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Write ``path`` atomically: ``write(f)`` fills ``f``, an open temporary file beside it.

    ``f`` is opened ``"wb"`` when ``binary`` is True, else ``"w"`` with UTF-8 encoding.
    After ``write`` returns the file is flushed, fsynced and moved onto ``path`` with
    ``os.replace``; if ``write`` raises, ``path`` is left as it was.
    """

    def fill(fd: int, tmp: str) -> None:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    with name_os_errors(path):
        _replace_with_temporary(path, fill)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder and ``os.replace``."""
    atomic_write(path, lambda f: f.write(text))


def atomic_write_bytes_from(path, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` to produce a file, then move it to ``path`` atomically.

    The temporary file keeps ``path``'s extension (matplotlib picks the format from it)
    and is fsynced before the move.
    """

    def fill(fd: int, tmp: str) -> None:
        os.close(fd)
        writer(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    with name_os_errors(path):
        _replace_with_temporary(path, fill, suffix=f".tmp{os.path.splitext(os.fspath(path))[1]}")


def read_json_lines(path, warnings: Optional[List[str]] = None, skip_damaged: bool = False) -> List[dict]:
    """Every JSON object of a JSON-lines file, in file order; ``[]`` when the file is missing.

    Blank lines are skipped. A last line that is not a JSON object is the line a run
    was writing when it was killed: it is dropped, and described in ``warnings`` when a
    list is given. Such a line anywhere else means the file is damaged: with
    ``skip_damaged`` it is skipped too (and described in ``warnings``), else
    :class:`ValueError` names the file and the line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    records: List[dict] = []
    for i, (n, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec, why = None, "not valid JSON"
        else:
            why = "not a JSON object"
        if isinstance(rec, dict):
            records.append(rec)
            continue
        if i == len(lines) - 1:
            if warnings is not None:
                warnings.append(f"{path}:{n}: {why} (the last line, cut short when the run was stopped?); dropped")
            continue
        if not skip_damaged:
            raise ValueError(f"{path}:{n}: {why}, and not the last line: the file is damaged")
        if warnings is not None:
            warnings.append(f"{path}:{n}: {why}; skipped")
    return records


class FolderLock:
    """Exclusive lock on a folder, held by one process at a time: a POSIX record lock
    (``fcntl.lockf``) on ``<folder>/.lock``.

    The operating system drops the lock when the process ends however it ends (killed
    with SIGKILL too), so a killed run never leaves it stuck; the file itself stays and
    only records the holder's pid. A record lock belongs to the process that took it:
    children it forks (data-loader workers) do not hold it, so they cannot keep a dead
    run's folder locked (an ``flock`` would be shared with them). Within one process a
    folder is locked once: a second :meth:`acquire` of the same folder by another
    ``FolderLock`` raises too. :meth:`acquire` raises
    :class:`~mdistiller_blockkd.errors.ConfigError` when another process (or object)
    holds it. Where ``fcntl`` does not exist (Windows) the lock is a no-op. Use as a
    context manager or with :meth:`acquire` / :meth:`release`.
    """

    NAME = ".lock"
    #: Lock files this process holds (a record lock does not exclude its own process, and
    #: closing any descriptor of the file would drop it).
    _held: set = set()

    def __init__(self, folder, what: str = "run folder"):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, self.NAME)
        self.what = what
        self._fd: Optional[int] = None

    def _busy(self, holder: str) -> ConfigError:
        return ConfigError(
            f"{self.what} '{self.folder}' is in use by another process (pid {holder}); wait for it to end, "
            "or set EXPERIMENT.NAME / LOG.PREFIX to another folder"
        )

    def acquire(self) -> "FolderLock":
        """Take the lock (creating the folder); raise ``ConfigError`` naming the holder if it is taken."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        if self._fd is not None:
            return self
        os.makedirs(self.folder, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in FolderLock._held:
            raise self._busy(f"{os.getpid()}, this process")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
            finally:
                os.close(fd)
            raise self._busy(holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        FolderLock._held.add(key)
        return self

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it)."""
        if self._fd is not None:
            FolderLock._held.discard(os.path.realpath(self.path))
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_output_path(path: Optional[str], option: str, folder: bool = False) -> None:
    """Raise :class:`UserError` when ``path`` (given as ``option``) cannot be the file -- or,
    with ``folder``, the folder -- a command will write: an empty path, an existing folder
    where a file is needed, an existing file where a folder is needed, or a path under a
    file. ``None`` (option not given) passes. Reads only, so a command can check its
    outputs before it works for minutes."""
    if path is None:
        return
    kind = "folder" if folder else "file"
    if not str(path).strip():
        raise UserError(f"{option} is empty; give a {kind} path")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{option} '{path}' is a file, not a folder; give a folder path (it is created if missing)")
    if not folder and os.path.isdir(path):
        raise UserError(f"{option} '{path}' is a folder; give a file path (a name inside that folder, for example)")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{option} '{path}' lies under '{parent}', which is a file, not a folder; choose another path")

