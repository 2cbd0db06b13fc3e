"""Read and write safetensors one tensor at a time, without memory maps.

``safe_open`` maps the whole file and every page read stays in the process RSS until the file is
closed, so a merge reading through it holds a full input shard. Here each tensor is read with a
plain ``readinto`` into its own buffer and written with a plain ``write`` into an output file whose
header was computed up front from the input headers: only the tensor being processed is in memory.
The format (8-byte little-endian header length, JSON header, packed data) is the public
safetensors spec; files written here load with ``safetensors`` and ``transformers`` as usual.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_lite.errors import SafetensorsError

DTYPE_OF = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}
NAME_OF = {v: k for k, v in DTYPE_OF.items()}


@dataclass
class TensorEntry:
    """One tensor of a checkpoint: where it lives and what it is."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int


def read_headers(files: Iterable[Path]) -> list[TensorEntry]:
    """Every tensor of the files, in file order and then data order.

    Raises:
        SafetensorsError: a header is truncated, not JSON, or names an unsupported dtype.
    """
    entries = []
    for path in files:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError(f"{path}: file too short to be safetensors")
            (size,) = struct.unpack("<Q", raw)
            if size > file_size - 8:  # random bytes give a length of petabytes: never allocate it
                raise SafetensorsError(f"{path}: not a safetensors file (its header length {size} exceeds the "
                                       f"file's {file_size} bytes); the file is damaged or truncated")
            try:
                header = json.loads(f.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{path}: damaged safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: damaged safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        for name, info in header.items():
            _check_entry(path, name, info, file_size - 8 - size)
        items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in items:
            begin, end = info["data_offsets"]
            entries.append(TensorEntry(name, DTYPE_OF[info["dtype"]], tuple(info["shape"]), Path(path),
                                       8 + size + begin, end - begin))
    return entries


def _check_entry(path: Path, name: str, info, data_size: int) -> None:
    """Raise SafetensorsError unless ``info`` is a well-formed header entry whose bytes lie in the file."""
    ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
          and isinstance(info.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in info["shape"])
          and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
          and all(isinstance(o, int) for o in info["data_offsets"]))
    if not ok:
        raise SafetensorsError(f"{path}: damaged safetensors header (entry {name!r} lacks a dtype, shape or "
                               "data_offsets)")
    if info["dtype"] not in DTYPE_OF:
        raise SafetensorsError(f"{path}: tensor {name} has dtype {info['dtype']}, which is not supported")
    begin, end = info["data_offsets"]
    numel = 1
    for d in info["shape"]:
        numel *= d
    if not 0 <= begin <= end <= data_size or end - begin != numel * DTYPE_OF[info["dtype"]].itemsize:
        raise SafetensorsError(f"{path}: damaged safetensors header (tensor {name}: offsets {begin}..{end} do not "
                               f"fit its shape or the file's {data_size} data bytes; the file may be truncated)")


def iter_tensors(entries: list[TensorEntry]):
    """Yield ``(entry, tensor)``; each tensor owns its memory (nothing of the file stays mapped)."""
    handle, current = None, None
    try:
        for entry in entries:
            if entry.file != current:
                if handle is not None:
                    handle.close()
                handle, current = open(entry.file, "rb"), entry.file
            buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
            handle.seek(entry.offset)
            if handle.readinto(memoryview(buffer.numpy())) != entry.nbytes:
                raise SafetensorsError(f"{entry.file}: truncated data for tensor {entry.name}")
            yield entry, buffer.view(entry.dtype).reshape(entry.shape)
    finally:
        if handle is not None:
            handle.close()


def read_rows(entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a tensor (along its first dimension), read alone: a check that walks a
    large matrix in row chunks never holds the whole of it.

    Raises:
        SafetensorsError: the file ends before those rows.
    """
    shape = tuple(entry.shape) or (1,)
    stop = min(stop, shape[0])
    row_bytes = entry.nbytes // max(1, shape[0])
    nbytes = (stop - start) * row_bytes
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    with open(entry.file, "rb") as handle:
        handle.seek(entry.offset + start * row_bytes)
        if handle.readinto(memoryview(buffer.numpy())) != nbytes:
            raise SafetensorsError(f"{entry.file}: truncated data for tensor {entry.name}")
    return buffer.view(entry.dtype).reshape((stop - start, *shape[1:]) if entry.shape else ())


def plan_shards(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list]:
    """Group ``(name, dtype, shape)`` in order into shards of at most ``max_bytes`` (a bigger tensor alone)."""
    shards, size = [[]], 0
    for name, dtype, shape in specs:
        nbytes = _nbytes(dtype, shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape))
        size += nbytes
    return shards


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=dtype).element_size()


def _header(shard: list) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in shard:
        nbytes = _nbytes(dtype, shape)
        header[name] = {"dtype": NAME_OF[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def shard_file_names(count: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-0000i-of-0000n.safetensors``, as transformers names them."""
    return ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                      for i in range(count)]


def write_sharded(
    folder: Path,
    shards: list[list],
    tensors: Iterable[tuple[str, torch.Tensor]],
    on_shard: Callable[[str], None] | None = None,
) -> list[str]:
    """Stream ``tensors`` (in the planned order) into ``model-0000i-of-0000n.safetensors`` + index.

    Args:
        shards: from ``plan_shards``; each tensor must arrive with the planned name, dtype and shape.
        tensors: ``(name, tensor)`` pairs, consumed one at a time.

    Returns:
        The shard file names. A single shard is named ``model.safetensors`` and gets no index.
    """
    n = len(shards)
    names = shard_file_names(n)
    stream = iter(tensors)
    weight_map, total = {}, 0
    for shard, file_name in zip(shards, names):
        with open(folder / file_name, "wb") as f:
            f.write(_header(shard))
            for name, dtype, shape in shard:
                got_name, tensor = next(stream)
                if got_name != name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise SafetensorsError(f"tensor stream out of plan: expected {name} {dtype} {shape}, got "
                                           f"{got_name} {tensor.dtype} {tuple(tensor.shape)}")
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
                weight_map[name] = file_name
                total += tensor.numel() * tensor.element_size()
            f.flush()
            os.fsync(f.fileno())
        if on_shard is not None:
            on_shard(file_name)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names
