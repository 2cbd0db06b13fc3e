"""Tokenizer metadata for GGUF files, and an Ollama Modelfile beside them.

Two tokenizer kinds are written, as llama.cpp's converter does:
- byte-level BPE (GPT-2 style, Llama 3, Qwen2): ``tokenizer.ggml.model = "gpt2"``, tokens, token
  types, merges, the pre-tokenizer name llama.cpp knows it by.
- sentencepiece-style BPE with byte fallback (Llama 2, Mistral): ``"llama"``, tokens, scores, types.
Special token ids, add-BOS/EOS flags and the chat template come from ``gguf.SpecialVocab``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

# Regexes of well-known byte-level pre-tokenizers -> llama.cpp's name for them (tokenizer.ggml.pre).
_KNOWN_PRE = (
    (r"\p{N}{1,3}", "llama-bpe"),  # Llama 3
    (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*", "qwen2"),
)


def _gguf():
    import gguf

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
    from .gguf_export import GGUFExportError

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
    if special.chat_template is None:  # training used the default template; so must inference
        from .data import DEFAULT_CHAT_TEMPLATE

        writer.add_chat_template(DEFAULT_CHAT_TEMPLATE)
    return dict(special.special_token_ids)


def _render(template: str, messages: list[dict], generation: bool, specials: dict) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=generation, **specials)


def ollama_template(template: str, specials: dict) -> str | None:
    """Translate a Jinja chat template into Ollama's Go template by rendering marker messages.

    Returns None when the template cannot be rendered this way (Ollama then uses the GGUF metadata).
    """
    sys_, user, reply = "\x00S\x00", "\x00U\x00", "\x00R\x00"
    try:
        with_system = _render(template, [{"role": "system", "content": sys_}, {"role": "user", "content": user}],
                              False, specials)
        prompt = _render(template, [{"role": "user", "content": user}], False, specials)
        generation = _render(template, [{"role": "user", "content": user}], True, specials)
        full = _render(template, [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
                       False, specials)
    except Exception as e:  # any template error means: leave it to Ollama
        log.warning("chat template could not be translated for Ollama (%s); the Modelfile has no TEMPLATE", e)
        return None
    # The user turn is what the prompt with and without a system message have in common at the end;
    # what precedes it in the prompt (e.g. a BOS token) precedes the system block too.
    common = 0
    while common < min(len(prompt), len(with_system)) and prompt[-1 - common] == with_system[-1 - common]:
        common += 1
    head, tail = prompt[: len(prompt) - common], prompt[len(prompt) - common:]
    system_part = with_system[len(head): len(with_system) - common]
    if not (with_system.startswith(head) and sys_ in system_part and user in tail and generation.startswith(prompt)
            and full.startswith(prompt) and reply in full):
        return None
    after_reply = full[full.index(reply) + len(reply):]
    return (head + "{{ if .System }}" + system_part.replace(sys_, "{{ .System }}") + "{{ end }}"
            + tail.replace(user, "{{ .Prompt }}") + generation[len(prompt):] + "{{ .Response }}" + after_reply)


def write_modelfile(gguf_file: Path, tok_dir: Path) -> Path:
    """Write an Ollama ``Modelfile`` beside ``gguf_file``: FROM, TEMPLATE (when translatable), stop tokens."""
    config_path = Path(tok_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    template = config.get("chat_template")
    if template is None and (Path(tok_dir) / "chat_template.jinja").exists():
        template = (Path(tok_dir) / "chat_template.jinja").read_text()
    if template is None:
        from .data import DEFAULT_CHAT_TEMPLATE

        template = DEFAULT_CHAT_TEMPLATE
    specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    lines = [f"FROM ./{gguf_file.name}", ""]
    go_template = ollama_template(template, specials) if isinstance(template, str) else None
    if go_template:
        lines += [f'TEMPLATE """{go_template}"""', ""]
    if specials.get("eos_token"):
        lines.append(f'PARAMETER stop "{specials["eos_token"]}"')
    path = gguf_file.with_name("Modelfile")
    path.write_text("\n".join(lines) + "\n")
    return path


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token
