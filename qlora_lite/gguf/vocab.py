"""Tokenizer metadata for GGUF files, and an Ollama Modelfile beside them.

Two tokenizer kinds are written, as llama.cpp's converter does:
- byte-level BPE (GPT-2 style, Llama 3, Qwen2): ``tokenizer.ggml.model = "gpt2"``, tokens, token
  types, merges, the pre-tokenizer name llama.cpp knows it by.
- sentencepiece-style BPE with byte fallback (Llama 2, Mistral): ``"llama"``, tokens, scores, types.
Special token ids, add-BOS/EOS flags and the chat template come from ``gguf.SpecialVocab``; the
add-BOS flag is always written, from what transformers' tokenizer does when the config does not say.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import gguf

from qlora_lite.data.tokenize import DEFAULT_CHAT_TEMPLATE
from qlora_lite.errors import GGUFExportError

log = logging.getLogger(__name__)


# Regexes of well-known byte-level pre-tokenizers -> llama.cpp's name for them (tokenizer.ggml.pre).
_KNOWN_PRE = (
    (r"\p{N}{1,3}", "llama-bpe"),  # Llama 3
    (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*", "qwen2"),
)


def _gguf():
    return gguf


def _pre_tokenizer_name(tokenizer: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE ("default" when unknown, with a warning)."""
    text = json.dumps(tokenizer.get("pre_tokenizer"))
    patterns = re.findall(r'"Regex": "((?:[^"\\]|\\.)*)"', text)
    for pattern in (json.loads(f'"{p}"') for p in patterns):
        for marker, name in _KNOWN_PRE:
            if marker in pattern:
                return name
    if '"ByteLevel"' in text and not patterns and '"use_regex": false' not in text:
        return "gpt-2"
    log.warning("unknown byte-level pre-tokenizer; writing tokenizer.ggml.pre='default' (llama.cpp may split "
                "text slightly differently from transformers)")
    return "default"


def _is_sentencepiece_style(tokenizer: dict) -> bool:
    model = tokenizer.get("model", {})
    decoder = json.dumps(tokenizer.get("decoder"))
    return bool(model.get("byte_fallback")) or "Metaspace" in decoder or "\u2581" in decoder


def _vocab(tokenizer: dict, vocab_size: int, spm: bool):
    """Token texts, types and scores for ids 0..n-1 (n = the larger of config and tokenizer sizes)."""
    gguf = _gguf()
    by_id = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    added = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    unk = tokenizer["model"].get("unk_token")
    size = max([vocab_size, *(i + 1 for i in by_id), *(i + 1 for i in added)])
    tokens, types, scores = [], [], []
    for i in range(size):
        if i in added:
            text = added[i]["content"]
            kind = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        elif i in by_id:
            text, kind = by_id[i], gguf.TokenType.NORMAL
        else:
            text, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        if spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            kind = gguf.TokenType.BYTE  # byte-fallback pieces, whether in the vocab or added
        if text == unk:
            kind = gguf.TokenType.UNKNOWN
        tokens.append(text)
        types.append(kind)
        # Sentencepiece BPE merges by score; its vocabularies are ordered by merge rank, so -id keeps
        # that order when the original tokenizer.model scores are not at hand.
        scores.append(-float(i) if kind == gguf.TokenType.NORMAL else 0.0)
    return tokens, types, scores


def add_tokenizer(writer, tok_dir: Path, vocab_size: int) -> dict[str, int]:
    """Add the tokenizer of ``tok_dir`` (tokenizer.json) to a GGUFWriter.

    Returns:
        Special token kind ("bos", "eos", "pad", ...) -> id, as written.

    Raises:
        GGUFExportError: no tokenizer.json, or a tokenizer model other than BPE.
    """
    path = Path(tok_dir) / "tokenizer.json"
    if not path.exists():
        raise GGUFExportError(f"{tok_dir} has no tokenizer.json; load the tokenizer with transformers and "
                              "save_pretrained() it to write one")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    if tokenizer.get("model", {}).get("type") != "BPE":
        raise GGUFExportError(f"{path}: tokenizer model {tokenizer.get('model', {}).get('type')!r} is not "
                              "supported; GGUF export handles BPE tokenizers (byte-level or sentencepiece-style)")
    spm = _is_sentencepiece_style(tokenizer)
    tokens, types, scores = _vocab(tokenizer, vocab_size, spm)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_tokenizer_pre("default" if spm else _pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:
        writer.add_token_scores(scores)
        normalizer = json.dumps(tokenizer.get("normalizer")) + json.dumps(tokenizer.get("pre_tokenizer"))
        writer.add_add_space_prefix('"Prepend"' in normalizer or '"prepend_scheme": "always"' in normalizer)
    special = _gguf().SpecialVocab(tok_dir, load_merges=not spm, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:
        # Without the key llama.cpp guesses from the tokenizer kind, and Ollama's own engine may guess
        # differently; what transformers does is what the model was trained with.
        writer.add_add_bos_token(hf_adds_bos(tok_dir))
    if special.chat_template is None:  # training used the default template; so must inference

        writer.add_chat_template(DEFAULT_CHAT_TEMPLATE)
    return dict(special.special_token_ids)


def hf_adds_bos(tok_dir: Path) -> bool:
    """Whether transformers' tokenizer of ``tok_dir`` starts an encoded text with the BOS token."""
    from transformers import AutoTokenizer  # noqa: PLC0415 (only GGUF export needs the whole tokenizer stack)

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def token_text(token) -> str | None:
    """The text of a special token as tokenizer_config.json writes it (a string, or a dict with "content")."""
    return token.get("content") if isinstance(token, dict) else token
