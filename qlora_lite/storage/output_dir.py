"""Where results go: refuse an unwritable destination before any model loads, and word a failed write.

A run that loads a 7B model for minutes and then finds its --output read-only has wasted those
minutes; ``check_writable`` probes the folder (by creating and removing a file, since permission bits
say nothing on read-only mounts or to root) before anything heavy starts. ``write_failure`` turns
an OSError from a write into what happened and what to do.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from qlora_lite.errors import OutputError

# The file check_writable creates and removes at once; another process of the same run may see it.
PROBE_PREFIX = ".qlora-lite-write-test-"


def check_writable(path: str | Path, flag: str = "--output") -> None:
    """Raise OutputError unless files can be created in ``path`` (or, if it does not exist yet, in the
    nearest existing folder above it, where it will be created)."""
    path = Path(path).absolute()
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{flag} {path}: {folder} is a file, not a folder; choose another {flag}")
    probe = folder / f"{PROBE_PREFIX}{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write in {folder} ({os.strerror(e.errno or errno.EACCES)}); "
                          f"choose a folder you can write, e.g. under your home folder") from None


def write_failure(e: OSError) -> str:
    """The reason of a failed write in words, with the usual remedy (e.g. ``no space left on device:
    free some space``)."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{reason.lower()}: free some disk space (or choose an --output on another disk)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{reason.lower()}: choose an --output you can write"
    return reason.lower()
