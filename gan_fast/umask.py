"""The permission bits a new file gets from open(): 0o666 less the process umask.

tempfile.mkstemp creates its file 0o600 whatever the umask, so a file written through a temporary file
and a rename (checkpoints, netG.pt) came out -rw------- while every other output was -rw-r--r--:
unreadable to the group that shares a cluster's run folders. Writers chmod their temporary file to
this before the rename."""
from __future__ import annotations

import os


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
