"""Writing an output file so that a crash never leaves half of it: the one home of the
temporary-file-then-rename write every output of gan_fast goes through (checkpoints, netG.pt and its
JSON, the loss plot, the cached reference statistics, benchmark results).

A kill mid-write leaves the previous file intact plus a ``.tmp-*`` file, which the next run in that
folder removes (checkpoint.remove_temporaries); with ``durable=True`` the new file also survives a
power cut once the call returns.
"""
from __future__ import annotations

import os
import tempfile
from typing import IO, Callable

TEMP_PREFIX = ".tmp-"


def new_file_mode() -> int:
    """0o666 & ~umask, read without changing the umask where the system reports it (Linux >= 4.7):
    setting it to read it back would briefly change the mode of files other threads create."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then restore it at once
    os.umask(mask)
    return 0o666 & ~mask


def fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (a rename is a change to the folder, durable only once the
    folder is synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: str) -> str:
    """A fixed temporary name next to ``path`` (for a write that is a link or a copy, not a stream)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{TEMP_PREFIX}{name}")


def write_atomic(path: str, write: Callable[[IO], None], *, text: bool = False, durable: bool = True) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, then rename it over ``path``.

    tempfile.mkstemp makes its file 0o600 whatever the umask, so the file is chmod-ed to the mode
    open() would give it: checkpoints came out -rw------- otherwise, unreadable to the group sharing a
    cluster's run folders."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)}-", dir=folder)
    try:
        os.chmod(tmp, new_file_mode())
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        fsync_folder(folder)
