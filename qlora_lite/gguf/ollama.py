"""An Ollama Modelfile beside a GGUF file: the chat template rendered in Ollama's template language."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from qlora_lite.data.tokenize import DEFAULT_CHAT_TEMPLATE
from qlora_lite.gguf.vocab import token_text

log = logging.getLogger(__name__)


def _render(template: str, messages: list[dict], generation: bool, specials: dict) -> str:
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
        template = DEFAULT_CHAT_TEMPLATE
    specials = {k: token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    lines = [f"FROM ./{gguf_file.name}", ""]
    go_template = ollama_template(template, specials) if isinstance(template, str) else None
    if go_template:
        lines += [f'TEMPLATE """{go_template}"""', ""]
    if specials.get("eos_token"):
        lines.append(f'PARAMETER stop "{specials["eos_token"]}"')
    path = gguf_file.with_name("Modelfile")
    path.write_text("\n".join(lines) + "\n")
    return path
