"""Files written safely: atomic writes (temporary + rename), temporaries named for their
writer and swept when that process is gone, disk-full and permission errors as one line,
JSON records, SHA-256 digests.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from semisam_o1.core.errors import InputError, OutputError

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()


TEMPORARY_MARK = ".~"


def temporary_prefix(name: str) -> str:
    """The start of the name of a temporary file or folder written beside ``name``:
    ``.~PID@HOST~NAME.`` (hidden; ``mkstemp`` / ``mkdtemp`` add a random part). The writer's
    process id and host let :func:`sweep_temporaries` tell a killed writer's leftovers from a live
    writer's (another process, or another machine of a Ray cluster sharing the folder)."""
    return f"{TEMPORARY_MARK}{os.getpid()}@{_host()}~{name}."


def _host() -> str:
    import socket

    return socket.gethostname()


def _temporary_owner(name: str) -> tuple[int, str] | None:
    """(pid, host) of a name made by :func:`temporary_prefix`, None for any other name."""
    if not name.startswith(TEMPORARY_MARK):
        return None
    owner, sep, _ = name[len(TEMPORARY_MARK):].partition("~")
    pid, at, host = owner.partition("@")
    return (int(pid), host) if sep and at and pid.isdigit() and host else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries in ``folder`` (not below it) that a writer on this host left when it
    was killed (SIGKILL, a lost Ray actor, a power cut) before it could rename or delete them:
    names made by :func:`temporary_prefix` whose process is no longer running. Temporaries of a
    live process, or of another host, are kept.

    Returns:
        the removed paths (files or folders).
    """
    import shutil

    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    here, removed = _host(), []
    for entry in entries:
        owner = _temporary_owner(entry.name)
        if owner is None or owner[1] != here or _alive(owner[0]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched,
    so no half-written output is ever visible. The temporary name keeps the
    file's endings (``.nii.gz``) so writers that look at the suffix still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp" + suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; outputs get the user's usual mode
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        full = is_write_failure(exc, path.parent)
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if full:
            raise OutputError(write_error_message(path, exc)) from None
        raise


def is_write_failure(exc: BaseException, folder: Path) -> bool:
    """``exc`` is a failed write into ``folder``: an OSError of a full disk, a read-only file system
    or a refused permission, or any writer's error (numpy's ``tofile`` and ``torch.save`` hide
    ENOSPC behind their own) raised while the file system has less than 64 KiB left."""
    if isinstance(exc, (InputError, KeyboardInterrupt)):
        return False
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return True
    return isinstance(exc, (OSError, RuntimeError, ValueError)) and _disk_full(folder)


def _disk_full(folder: Path) -> bool:
    """Less than 64 KiB left on the file system of ``folder``."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (64 << 10)


def write_error_message(path, exc: BaseException) -> str:
    """One line for an output that could not be written (disk full, read-only, no permission)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror and exc.errno in WRITE_ERRNOS else None
    reason = reason or os.strerror(errno.ENOSPC)  # only full disks reach here without an errno
    return (f"{path}: cannot write ({reason}); nothing half-written is left and finished outputs "
            "are kept: free space or fix the folder, then run the same command again to resume")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (weights, inputs: part of stores' signatures)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def write_json_key(path: str | os.PathLike, key: str, value) -> None:
    """Read-modify-write of one top-level ``key`` of a JSON object file, atomically
    (benchmark results files that several benchmarks share). A missing or unparsable
    file starts from an empty object."""
    path = Path(path)
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    data[key] = value
    write_json(path, data)



def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file ``src`` to ``dst`` through :func:`atomic_path` (never a half-written ``dst``)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
