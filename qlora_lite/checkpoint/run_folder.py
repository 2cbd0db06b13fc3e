"""Ownership of a training output folder: the run marker, the files a run wrote, and the run lock.

A folder is a qlora-lite run only if it holds ``RUN_MARKER``, written by the run that created it.
The marker records the SHA-256 of each top-level file the run wrote and may replace later
(config.yaml, the adapter files), so a later run replaces only files that are still exactly what
qlora-lite wrote: a YAML or adapter the user put or edited there is never overwritten.

``RunLock`` holds an ``fcntl.flock`` on ``LOCK_NAME`` while a run is alive, so a second run on the same
folder is refused; the kernel drops the lock when the process dies (even by SIGKILL), so a crashed
run never leaves the folder stuck.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qlora_lite.errors import CheckpointError
from qlora_lite.storage.durable import file_sha256

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded against each other there
    fcntl = None
RUN_MARKER = ".qlora-lite-run"
LOCK_NAME = ".qlora-lite-lock"


# Top-level files a run writes and a later run of the same folder may replace (checked by hash).
REPLACED_FILES = ("config.yaml", "adapter_config.json", "adapter_model.safetensors", "qlora_lite.json")


def read_marker(folder: Path) -> dict | None:
    """The marker's content, or None when ``folder`` has no marker (it is not a qlora-lite run)."""
    path = Path(folder) / RUN_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text() or "{}")
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: damaged run marker (not valid JSON); if this folder is a qlora-lite run, "
                              "replace the file's content with {} and retry") from None
    return marker if isinstance(marker, dict) else {}


def mark_run(folder: Path, written: tuple[str, ...] = ()) -> None:
    """Create the marker if missing and record the hashes of ``written`` files (names in ``folder``)."""
    folder = Path(folder)
    marker = read_marker(folder) or {"format": 1, "written_by": "qlora-lite train"}
    files = marker.setdefault("files", {})
    for name in written:
        files[name] = file_sha256(folder / name)
    tmp = folder / (RUN_MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, folder / RUN_MARKER)


def not_ours(folder: Path) -> list[str]:
    """Files of ``REPLACED_FILES`` present in ``folder`` that differ from what the marker recorded."""
    files = (read_marker(folder) or {}).get("files", {})
    return [name for name in REPLACED_FILES if (Path(folder) / name).is_file()
            and files.get(name) != file_sha256(Path(folder) / name)]


class RunLock:
    """An exclusive lock on a run folder for the life of this process (or until ``release``)."""

    def __init__(self, folder: Path):
        self.path, self.fd = Path(folder) / LOCK_NAME, None

    def acquire(self) -> RunLock:
        """Take the lock. Raises CheckpointError when another live process holds it."""
        if fcntl is None or self.fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"--output {self.path.parent} is in use by another qlora-lite train (pid {holder}); "
                                  "wait for it to finish, or choose another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
