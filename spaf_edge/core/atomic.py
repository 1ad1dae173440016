"""Atomic writes: a reader sees the old file or folder or the new one, never a half-written one.

A full disk (or quota) becomes one :class:`~spaf_edge.core.errors.StorageError` naming the folder,
with nothing half-written left. A process killed while writing a folder leaves its hidden
``.NAME.pPID-HOST.XXXX.partial`` sibling; the next :func:`atomic_directory` in that parent
removes the partials whose process no longer runs on this host (never a live one's).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from spaf_edge.core.errors import StorageError

logger = logging.getLogger(__name__)

NO_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
PARTIAL_SUFFIX = ".partial"
# .NAME.pPID-HOST.RANDOM.partial; HOST keeps only [A-Za-z0-9-], so the owner part has no dot
_PARTIAL = re.compile(r"^\..*\.p(\d+)-([A-Za-z0-9-]*)\.[^.]+\.partial$")


def _default_mode(directory: bool) -> int:
    """What ``open``/``mkdir`` would give under the process umask (mkstemp/mkdtemp use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _full_disk_reported(path.parent, len(data)):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(exc):
            raise no_space_error(path.parent, len(data)) from exc
        raise


def build_once(path: str | os.PathLike, is_built: Callable[[], bool], build: Callable[[], object]) -> Path:
    """Run ``build()`` unless ``is_built()``, under :func:`build_lock`; returns ``path``.

    Two processes that need the same cached build (two distill shards, two benches) then build it
    once: the second waits for the lock, finds the build done, and reuses it.
    """
    path = Path(path)
    if is_built():
        return path
    with build_lock(path):
        if not is_built():  # else another process built it while this one waited
            build()
    return path


@contextlib.contextmanager
def build_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on building ``path`` (a hidden ``.NAME.lock`` beside it) for the block.

    The lock goes with the process (the OS releases it when a holder dies). POSIX only; where
    ``fcntl`` is missing, no lock (the build is still atomic, just possibly done twice).
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike, overwrite: bool = True, expected_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename.

    On any exception the temporary folder is removed and ``path`` is untouched, so a
    failed export or checkpoint never leaves a folder that looks complete. ``expected_bytes``
    (an estimate of what will be written) fails early when the disk has less free space.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True or choose another path.")
    remove_stale_partials(path.parent)
    if expected_bytes is not None and _free_bytes(path.parent) < expected_bytes:
        raise no_space_error(path.parent, expected_bytes)
    with _full_disk_reported(path.parent, expected_bytes):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_owner_tag()}.", suffix=PARTIAL_SUFFIX))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(directory=True))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        written = _folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc) and not isinstance(exc, StorageError):  # a nested atomic write already said so
            raise no_space_error(path.parent, expected_bytes, written) from exc
        raise


def no_space_error(directory: Path, needed: int | None, written: int = 0) -> StorageError:
    """The StorageError for a full disk: how much was needed (or written before it filled) and is free."""
    free = _free_bytes(directory)
    if needed is not None:
        need = f"need about {_mb(needed)}, {_mb(free)} free"
    else:
        need = f"need more than the {_mb(free)} free ({_mb(written)} were written before the disk filled)"
    error = StorageError(
        f"Not enough disk space in {directory}: {need}. Nothing was kept; free some space or write elsewhere."
    )
    error.errno = errno.ENOSPC
    return error


@contextlib.contextmanager
def _full_disk_reported(directory: Path, needed: int | None) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if _disk_full(exc):
            raise no_space_error(directory, needed) from exc
        raise


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is a full disk or quota (ENOSPC, EDQUOT)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def remove_stale_partials(parent: str | os.PathLike) -> list[Path]:
    """Remove the ``.partial`` folders in ``parent`` left by processes of this host that no longer run."""
    removed = []
    host = _host()
    for candidate in Path(parent).glob(f".*{PARTIAL_SUFFIX}"):
        match = _PARTIAL.match(candidate.name)
        if not match or match.group(2) != host or not candidate.is_dir() or _process_alive(int(match.group(1))):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        if not candidate.exists():
            logger.warning("Removed %s, left by an interrupted write (process %s no longer runs).",
                           candidate, match.group(1))
            removed.append(candidate)
    return removed


def _owner_tag() -> str:
    return f"p{os.getpid()}-{_host()}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (or cannot be ruled out: on Windows, signal 0 would kill it, so assume it runs)."""
    if os.name == "nt" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it runs, as another user
        return True
    return True


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _mb(nbytes: int) -> str:
    if nbytes >= 1e6:
        return f"{nbytes / 1e6:.0f} MB"
    return f"{nbytes / 1e3:.1f} kB" if nbytes >= 1e3 else f"{nbytes} bytes"
