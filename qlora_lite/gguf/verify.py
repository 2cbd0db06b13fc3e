"""Read a freshly written GGUF file back and check it against what the writer was asked to write.

llama.cpp and Ollama only tell a user about a broken GGUF file when they fail to load it, long
after the export. So ``export_gguf`` writes to a temporary name, runs ``verify_gguf`` on it and only
then renames it into place. The check is a memory-mapped read with ``gguf.GGUFReader`` (no model
compute):

- the header parses (magic, version), every planned tensor is there once with its name, GGML type
  and shape, its bytes lie inside the file, aligned, without overlapping another tensor;
- the bytes of every tensor have the CRC-32 computed while writing them (quantized types: the
  blocks), so a flipped byte, a truncated file or a tensor written into another's slot is found;
- every metadata key given to the writer reads back with the same value, the keys llama.cpp needs
  are present, and they agree with the tensors (token count == embedding rows, block count ==
  number of ``blk.N`` groups, special token ids inside the vocabulary).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from qlora_lite.errors import GGUFVerifyError

_MAX_LISTED = 12  # problems listed in one error; the count of the rest follows
_CHUNK = 16 << 20  # bytes read at a time for the CRC: a plain read keeps the file out of the process's RSS


def format_problems(problems: list[str]) -> str:
    """The problems as an indented list, at most ``_MAX_LISTED`` of them."""
    more = [f"... and {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED else []
    return "".join(f"\n  - {line}" for line in problems[:_MAX_LISTED] + more)


@dataclass
class ExpectedGGUF:
    """What the writer was asked to write, filled in while writing.

    Attributes:
        arch: GGUF architecture name ("llama", "qwen2").
        tensors: GGUF tensor name -> (kind, shape); kind is a GGML type in lower case (f32, f16, bf16,
            q8_0, q4_k ...: ``gguf.mix.tensor_type``), shape in PyTorch order, e.g. (vocab, hidden)
            for token_embd.weight.
        metadata: key -> ``gguf.GGUFValue`` as handed to the writer (``GGUFWriter.kv_data[0]``).
        specials: special token kind ("bos", "eos", ...) -> id the source tokenizer defines.
        crc32: GGUF tensor name -> CRC-32 of the bytes written for it.
        required_keys: metadata keys (``gguf.Keys`` templates with ``{arch}``) this architecture needs
            beyond those every one does.
    """

    arch: str
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict = field(default_factory=dict)
    specials: dict[str, int] = field(default_factory=dict)
    crc32: dict[str, int] = field(default_factory=dict)
    required_keys: tuple[str, ...] = ()

    def record(self, name: str, array: np.ndarray) -> np.ndarray:
        """Remember the CRC-32 of ``array``'s bytes (C order, as ``tofile`` writes them); return it unchanged."""
        self.crc32[name] = zlib.crc32(np.ascontiguousarray(array).data)
        return array


def _gguf():
    return gguf


def required_keys(arch: str, tokenizer_model: str | None, specials: dict[str, int],
                  arch_keys: tuple[str, ...] = ()) -> list[str]:
    """Metadata keys llama.cpp needs to load and run an ``arch`` model with this tokenizer.

    Args:
        arch_keys: ``gguf.Keys`` templates only this architecture needs (``Architecture.required_keys``).
    """
    keys = _gguf().Keys
    llm = [keys.LLM.BLOCK_COUNT, keys.LLM.CONTEXT_LENGTH, keys.LLM.EMBEDDING_LENGTH, keys.LLM.FEED_FORWARD_LENGTH,
           keys.Attention.HEAD_COUNT, keys.Attention.HEAD_COUNT_KV, keys.Attention.LAYERNORM_RMS_EPS,
           keys.Rope.FREQ_BASE, *arch_keys]
    names = [keys.General.ARCHITECTURE, *(k.format(arch=arch) for k in llm), keys.Tokenizer.MODEL,
             keys.Tokenizer.LIST, keys.Tokenizer.TOKEN_TYPE, keys.Tokenizer.CHAT_TEMPLATE]
    # llama.cpp refuses a BPE ("gpt2") vocabulary without merges and scores a sentencepiece one.
    names.append(keys.Tokenizer.MERGES if tokenizer_model == "gpt2" else keys.Tokenizer.SCORES)
    names += [f"tokenizer.ggml.{kind}_token_id" for kind in ("bos", "eos") if kind in specials]
    return names


def _same_value(found, expected, value_type) -> bool:
    gguf = _gguf()
    if value_type == gguf.GGUFValueType.FLOAT32 or (isinstance(expected, (list, tuple)) and expected
                                                     and isinstance(expected[0], float)):
        return np.array_equal(np.asarray(found, np.float32), np.asarray(expected, np.float32))
    if isinstance(expected, (list, tuple)):
        return list(found) == [e.decode() if isinstance(e, bytes) else e for e in expected]
    return found == (expected.decode() if isinstance(expected, bytes) else expected)


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"{len(value)} values starting {list(value[:3])!r}"
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _check_metadata(reader, expected: ExpectedGGUF) -> list[str]:
    """Every key handed to the writer reads back with the same type and value; llama.cpp's keys are present."""
    problems = []
    for key, value in expected.metadata.items():
        found = reader.fields.get(key)
        if found is None:
            problems.append(f"metadata {key}: missing (written: {_show(value.value)})")
        elif found.types[0] != value.type:
            problems.append(f"metadata {key}: type {found.types[0].name}, expected {value.type.name}")
        elif not _same_value(found.contents(), value.value, value.type):
            problems.append(f"metadata {key}: {_show(found.contents())}, expected {_show(value.value)}")
    for key in reader.fields.keys() - expected.metadata.keys():
        if not key.startswith("GGUF."):  # the reader's own entries: version and counts
            problems.append(f"metadata {key}: in the file but never written")
    model = reader.fields.get("tokenizer.ggml.model")
    for key in required_keys(expected.arch, model.contents() if model else None, expected.specials,
                             expected.required_keys):
        if key not in reader.fields and key not in expected.metadata:  # not written at all
            problems.append(f"metadata {key}: missing; llama.cpp needs it for a {expected.arch} model")
    return problems


def _file_crc32(path: str, start: int, end: int, buffer: bytearray) -> int:
    """CRC-32 of bytes ``start..end`` of ``path``, read ``len(buffer)`` bytes at a time."""
    crc, view = 0, memoryview(buffer)
    with open(path, "rb") as f:
        f.seek(start)
        while start < end:
            n = f.readinto(view[: min(len(buffer), end - start)])
            if not n:
                break  # past the end of the file: the caller's bounds check already reported it
            crc = zlib.crc32(view[:n], crc)
            start += n
    return crc


def _check_tensors(reader, expected: ExpectedGGUF, file_size: int) -> list[str]:
    """Names, types, shapes, byte ranges and CRC-32 of the tensor data against the plan."""
    gguf = _gguf()
    problems = []
    buffer = bytearray(_CHUNK)
    found = {t.name: t for t in reader.tensors}
    for name in expected.tensors.keys() - found.keys():
        problems.append(f"tensor {name}: missing from the file")
    for name in found.keys() - expected.tensors.keys():
        problems.append(f"tensor {name}: in the file but never planned")
    ranges = []
    for name, (kind, shape) in expected.tensors.items():
        tensor = found.get(name)
        if tensor is None:
            continue
        ggml_type = gguf.GGMLQuantizationType[kind.upper()]
        shape_found = tuple(reversed([int(d) for d in tensor.shape]))  # GGUF stores ne0 (the row length) first
        if tensor.tensor_type != ggml_type:
            problems.append(f"tensor {name}: type {tensor.tensor_type.name}, expected {ggml_type.name}")
        if shape_found != tuple(shape):
            problems.append(f"tensor {name}: shape {shape_found}, expected {tuple(shape)}")
        start, end = tensor.data_offset, tensor.data_offset + _nbytes(kind, shape)
        if start % reader.alignment:
            problems.append(f"tensor {name}: data at byte {start}, not aligned to {reader.alignment}")
        if end > file_size:
            problems.append(f"tensor {name}: data ends at byte {end}, past the end of the file ({file_size} bytes)")
            continue
        ranges.append((start, end, name))
        crc = _file_crc32(reader.data.filename, start, end, buffer)
        if name not in expected.crc32:
            problems.append(f"tensor {name}: planned but its data was never written")
        elif crc != expected.crc32[name]:
            problems.append(f"tensor {name}: data CRC-32 {crc:08x}, expected {expected.crc32[name]:08x} "
                            f"(bytes {start}..{end} differ from what was written)")
    ranges.sort()
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
        if start < end:
            problems.append(f"tensor {second}: data overlaps tensor {first}")
    return problems


def _check_consistency(reader, arch: str) -> list[str]:
    """Cross-checks llama.cpp makes on loading: vocabulary vs embedding rows, blocks, heads, special ids."""
    fields = {k: f.contents() for k, f in reader.fields.items()
              if k.startswith(f"{arch}.") or k.endswith("_token_id") or k == "tokenizer.ggml.tokens"}
    shapes = {t.name: tuple(reversed([int(d) for d in t.shape])) for t in reader.tensors}
    problems = []
    n_tokens = len(fields.get("tokenizer.ggml.tokens") or [])
    for name in ("token_embd.weight", "output.weight"):
        if name in shapes and shapes[name][0] != n_tokens:
            problems.append(f"tensor {name}: {shapes[name][0]} rows but the tokenizer has {n_tokens} tokens; "
                            "llama.cpp rejects this (resize the embeddings to the tokenizer before exporting)")
    if "token_embd.weight" in shapes and fields.get(f"{arch}.embedding_length") != shapes["token_embd.weight"][1]:
        problems.append(f"metadata {arch}.embedding_length: {fields.get(f'{arch}.embedding_length')}, "
                        f"expected {shapes['token_embd.weight'][1]} (token_embd.weight columns)")
    blocks = {int(m.group(1)) for name in shapes if (m := re.match(r"blk\.(\d+)\.", name))}
    if fields.get(f"{arch}.block_count") not in (None, len(blocks)):
        problems.append(f"metadata {arch}.block_count: {fields[f'{arch}.block_count']}, but the file has "
                        f"{len(blocks)} blk.N tensor groups")
    heads, kv_heads = fields.get(f"{arch}.attention.head_count"), fields.get(f"{arch}.attention.head_count_kv")
    if heads and kv_heads and heads % kv_heads:
        problems.append(f"metadata {arch}.attention.head_count {heads} is not a multiple of head_count_kv {kv_heads}")
    for key, value in fields.items():
        if key.endswith("_token_id") and not 0 <= value < n_tokens:
            problems.append(f"metadata {key}: {value}, outside the {n_tokens}-token vocabulary")
    return problems + _check_name_lookups(reader)


# Tokens llama.cpp's vocabulary loader looks up (and fails without) when general.name contains a marker.
_NAME_LOOKUPS = {("phi-3", "phi3"): ("</s>", "<unk>", "<s>", "<|endoftext|>")}


def _check_name_lookups(reader) -> list[str]:
    name_field, tokens_field = reader.fields.get("general.name"), reader.fields.get("tokenizer.ggml.tokens")
    if name_field is None or tokens_field is None:
        return []
    name, tokens = name_field.contents(), set(tokens_field.contents())
    problems = []
    for markers, looked_up in _NAME_LOOKUPS.items():
        missing = [t for t in looked_up if t not in tokens]
        if any(m in name.lower() for m in markers) and missing:
            problems.append(f"metadata general.name {name!r} makes llama.cpp look up {', '.join(missing)} in the "
                            "vocabulary, which lacks it, so llama.cpp fails to load the file; the name is the model "
                            "folder's: rename the folder (or add the tokens to the tokenizer)")
    return problems


def verify_gguf(path: str | Path, expected: ExpectedGGUF) -> str:
    """Read ``path`` back (memory-mapped) and compare it with ``expected``.

    Returns:
        One line saying what was checked, e.g. "verified: 21 tensors (CRC-32), 31 metadata keys,
        tokenizer 320 tokens".

    Raises:
        GGUFVerifyError: listing every difference (tensor name, found vs expected).
    """
    gguf = _gguf()
    path = Path(path)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # any parse failure means llama.cpp cannot read it either
        planned = sum(gguf.GGUFWriter.ggml_pad(_nbytes(kind, shape), gguf.GGUF_DEFAULT_ALIGNMENT)
                      for kind, shape in expected.tensors.values())
        hint = f"; its tensor data alone needs {planned} bytes: truncated?" if size < planned else ""
        problem = f"cannot be read back as GGUF ({type(e).__name__}: {e}); the file is {size} bytes{hint}"
        raise GGUFVerifyError(f"{path}: {problem}", [problem]) from None
    problems = []
    version = reader.fields["GGUF.version"].contents()
    if version != gguf.GGUF_VERSION:
        problems.append(f"header: GGUF version {version}, expected {gguf.GGUF_VERSION}")
    problems += _check_tensors(reader, expected, size)
    problems += _check_metadata(reader, expected)
    problems += _check_consistency(reader, expected.arch)
    if problems:
        raise GGUFVerifyError(f"{path}: the GGUF file read back does not match what was written:"
                              + format_problems(problems), problems)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return (f"verified: {len(reader.tensors)} tensors (types, shapes, CRC-32 of the data), "
            f"{reader.fields['GGUF.kv_count'].contents()} metadata keys, tokenizer {len(tokens.data) if tokens else 0} tokens")


def _nbytes(kind: str, shape: tuple[int, ...]) -> int:
    gguf = _gguf()
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind.upper()]]
    return int(np.prod(shape)) * type_size // block
