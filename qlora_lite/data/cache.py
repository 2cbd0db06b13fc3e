"""The tokenized-data cache: a second run on the same data, tokenizer, template and settings starts
without tokenizing again.

One safetensors file per key (no pickle): the token ids and labels of all examples concatenated
(int32), their offsets (int64), and the data summary as JSON metadata. The key is the sha256 of the
data's digest (``sources.source_sha256``), the tokenizer's full serialization with its chat template
and special tokens, the loading settings and this module's format version, so any change that could
change a token misses the cache. Files are written under a temporary name, then renamed; an unreadable
one is tokenized again and replaced. The folder can be deleted at any time.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qlora_lite import __version__

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # raise when tokenization or this file's layout changes
CACHE_ENV = "QLORA_LITE_CACHE"
KEYS = ("input_ids", "labels")


def resolve_cache_dir(setting: str | None) -> Path | None:
    """The cache folder for ``--data-cache``: a path; ``none``; or ``auto``: $QLORA_LITE_CACHE (which may
    itself say none), else $XDG_CACHE_HOME/qlora-lite/tokenized (~/.cache when unset)."""
    value = (setting or "auto").strip()
    if value.lower() == "auto":
        value = os.environ.get(CACHE_ENV, "").strip() or str(
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora-lite" / "tokenized")
    return None if value.lower() == "none" else Path(value).expanduser()


def tokenizer_digest(tokenizer) -> str | None:
    """sha256 of everything about ``tokenizer`` that decides the tokens: its full serialization (vocabulary,
    merges, normalizer, pre- and post-processor, added tokens), chat template and special tokens.
    None for a tokenizer without a ``tokenizers`` backend (then nothing is cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    special = {name: (getattr(tokenizer, name, None), getattr(tokenizer, f"{name}_id", None))
               for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    described = json.dumps({"class": type(tokenizer).__name__, "template": tokenizer.chat_template,
                            "special": special}, sort_keys=True, default=str)
    digest = hashlib.sha256(backend.to_str().encode())
    digest.update(described.encode())
    return digest.hexdigest()


def cache_key(data_digest: str, tokenizer, settings: dict) -> str | None:
    """The cache key of one load, or None when the tokenizer cannot be fingerprinted."""
    tok = tokenizer_digest(tokenizer)
    if tok is None:
        return None
    material = {"format": CACHE_FORMAT, "version": __version__, "data": data_digest, "tokenizer": tok, **settings}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def read_cached(folder: Path, key: str) -> tuple[list[dict], dict] | None:
    """``(examples, stats dict)`` cached under ``key``, or None (not there, or unreadable: warned)."""
    path = folder / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(path, "pt") as f:  # tolist() copies: nothing keeps the file's mapping alive
            stats = json.loads(f.metadata()["stats"])
            offsets = f.get_tensor("offsets").tolist()
            columns = {k: f.get_tensor(k).tolist() for k in KEYS}
        if offsets[0] != 0 or any(len(c) != offsets[-1] for c in columns.values()):
            raise ValueError("offsets do not match the tokens")
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        log.warning("tokenized cache %s is unreadable (%s); tokenizing again", path, exc)
        return None
    examples = [{k: columns[k][a:b] for k in KEYS} for a, b in zip(offsets, offsets[1:])]
    return examples, stats


def write_cached(folder: Path, key: str, examples: list[dict], stats: dict) -> Path | None:
    """Store ``examples`` (dicts of exactly input_ids and labels) under ``key``; a failure only warns."""
    if any(set(e) != set(KEYS) for e in examples):
        return None
    offsets = [0]
    columns = {k: array.array("i") for k in KEYS}  # C ints: filled at C speed, no list of all tokens
    for example in examples:
        offsets.append(offsets[-1] + len(example["input_ids"]))
        for k in KEYS:
            columns[k].extend(example[k])
    tensors = {k: torch.frombuffer(columns[k], dtype=torch.int32) if offsets[-1] else torch.zeros(0, dtype=torch.int32)
               for k in KEYS}
    tensors["offsets"] = torch.tensor(offsets, dtype=torch.int64)
    path = folder / f"{key}.safetensors"
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes of one run may write the same key
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"stats": json.dumps(stats)})
        os.replace(tmp, path)  # readers see the whole file or none (an unreadable one is tokenized again)
    except (OSError, SafetensorError) as exc:  # the cache only saves time: a full disk must not stop a run
        log.warning("cannot write the tokenized cache %s (%s); the next run tokenizes again", path, exc)
        tmp.unlink(missing_ok=True)
        return None
    return path
