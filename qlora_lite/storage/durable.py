"""Durable checkpoint files: fsynced writes that surface a full disk, reads that name the bad file.

Every checkpoint module writes and reads through these helpers, so that a failure anywhere is one
``CheckpointError`` line naming the file (missing, empty, truncated, not valid JSON, a damaged
safetensors header) and a write is on disk (file and folder fsynced) before the next step relies on it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save, save_file

from qlora_lite.errors import CheckpointError


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON through a temporary file, fsync, rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. disk full: leave no half file behind (``path`` itself is untouched)
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors ``save_file`` through a temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. disk full: leave no half file behind (``path`` itself is untouched)
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (datasets and optimizer states can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Persist a folder's entries (new names, renames); not possible on Windows, where it is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot fsync folders
            raise
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` with plain ``os.write`` calls and fsync: short writes and ENOSPC surface as OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written == 0:  # a regular file only stops accepting bytes when the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def json_bytes(obj) -> bytes:
    """``obj`` as indented JSON bytes; raises TypeError/ValueError for what JSON cannot hold."""
    return json.dumps(obj, indent=1).encode()


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """A safetensors file's bytes for ``tensors`` (built in memory, written later with ``write_bytes``)."""
    return save(tensors, metadata={"format": "pt"})


def safetensors_error() -> type:
    """safetensors' own exception class (imported on first use, like the other safetensors imports here)."""
    return SafetensorError


def read_json(path: Path):
    """The parsed JSON file. Raises CheckpointError: ``FILE: missing``, ``empty`` or ``not valid JSON``."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        what = "empty" if path.stat().st_size == 0 else f"not valid JSON ({e})"
        raise CheckpointError(f"{path}: {what}") from None


def read_json_object(path: Path, error: type[Exception], remedy: str) -> dict:
    """A JSON object from a file the user gave (a model or adapter folder's), or ``error`` naming
    FILE:LINE:COLUMN and ending with ``remedy`` (what to do)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); {remedy}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (not UTF-8); {remedy}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {type(value).__name__}; {remedy}")
    return value


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file. Raises CheckpointError naming the file when it cannot be read."""
    try:
        return load(path.read_bytes())  # bytes, not a mapping: nothing keeps the file open
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def check_safetensors(path: Path) -> None:
    """The header parses and the data section ends exactly at the end of the file (no tensor is read).

    Raises:
        CheckpointError: naming the file, its size and what the header says.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 2 or n > size - 8:
            raise CheckpointError(f"{path}: damaged safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
            end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: damaged safetensors header (not valid JSON)") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or padded safetensors file ({size} bytes, header says {8 + n + end})")
