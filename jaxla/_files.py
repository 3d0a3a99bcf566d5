"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Data goes to a temporary file in the destination's directory, is flushed and fsynced, and is then
renamed over the destination with ``os.replace`` (atomic on POSIX and Windows). On any error the
temporary file is removed and the destination is left as it was.
"""

from __future__ import annotations

import os
import tempfile


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically; the parent directory must exist."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {path!r}: directory {parent!r} does not exist")
    mode = _target_mode(path)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _target_mode(path: str) -> int:
    """The replaced file's mode, or 0o666 less the process umask for a new file."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0o022)  # reading the umask means setting it; restore at once
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of :func:`write_atomic`."""
    write_atomic(path, text.encode("utf-8"))
