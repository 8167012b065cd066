"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Every writer goes through a temp file ``.<name>.<pid>.tmp`` in the destination's folder (the same
file system, so the final ``os.replace`` is a rename), flushed and fsynced before the rename, and the
folder fsynced after it, so the rename survives a power cut too. Any error (Ctrl-C and SIGTERM
included) removes the temp file and leaves the old destination untouched.

The new file gets the permissions a plain ``open(path, "w")`` would give it: the existing
destination's mode if there is one, else ``0o666`` less the umask; ``mode=`` sets them explicitly.
One writer per destination per process: two threads writing the same path at once share the temp name.

:func:`file_digest` is a file's content hash, for config hashes that must follow a file's bytes, not its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path


def temp_path_for(path: Path) -> Path:
    """The temp file a write of ``path`` goes through (hidden, per process, matched by ``.*tmp``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_dir(directory: Path) -> None:
    # the rename is an entry of the folder: without this a power cut can lose it
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform or file system that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename is done anyway
        pass
    finally:
        os.close(fd)


def _final_mode(path: Path, mode: int | None) -> int | None:
    """The permissions to give the new file; None: keep what creating it gave it."""
    if mode is not None:
        return mode
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None


def _commit(tmp: Path, path: Path, mode: int | None) -> None:
    final = _final_mode(path, mode)
    if final is not None:
        os.chmod(tmp, final)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; creates missing parent folders.

    ``mode``: the new file's permissions (default: the old file's, else ``0o666`` less the umask).
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        # 0o666: the kernel applies the umask, as for any file the user writes
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        _commit(tmp, path, mode)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """A temp path for writers that want a file name (``torch.save``, ``pq.write_table``,
    ``Figure.savefig`` with an explicit ``format=``): on a normal exit of the block it is fsynced and
    renamed onto ``path``; on any error it is removed and ``path`` is left as it was.

    The temp name does not end in ``path``'s suffix, so writers that guess the format from the
    name must be told it. Creates missing parent folders.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} (the temp file for {path})")
        with open(tmp, "rb") as handle:  # what the writer left in the page cache reaches the disk
            os.fsync(handle.fileno())
        _commit(tmp, path, mode)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


#: (resolved path, size, mtime in ns) -> SHA-256 hex digest; a file is read once per content version
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), cached by (resolved path, size, mtime).

    Hashing a large weights file takes seconds and config hashes are asked for often, so a file
    whose size and modification time are unchanged is not read again; rewriting it (even with the
    same size) changes its mtime and so its entry.
    """
    resolved = Path(path).expanduser().resolve()
    info = os.stat(resolved)
    key = (str(resolved), info.st_size, info.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        hasher = hashlib.sha256()
        with open(resolved, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(chunk)
        digest = _DIGESTS[key] = hasher.hexdigest()
    return digest
