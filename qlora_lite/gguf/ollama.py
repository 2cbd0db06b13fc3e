"""An Ollama Modelfile beside a GGUF file: the chat template in Ollama's Go template language.

Ollama renders a chat by executing the Modelfile's TEMPLATE (Go ``text/template``) over the
conversation (``.Messages``, each with ``.Role`` and ``.Content``; ``.System``, the system messages
joined). We read the Jinja chat template's per-role pieces off renderings of marker conversations
(``ChatFormat``), write a Go template that puts the same pieces around each message, and check the
translation by rendering sample conversations both ways before writing it: a template whose output
depends on more than the role (positions, content tests) is not translated, and Ollama falls back
on its own detection from the GGUF file's ``tokenizer.chat_template``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qlora_lite.data.tokenize import DEFAULT_CHAT_TEMPLATE
from qlora_lite.gguf.vocab import token_text

log = logging.getLogger(__name__)

# generation_config.json key -> Ollama PARAMETER name, for the sampling settings a model ships with.
SAMPLING_PARAMETERS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                       "repetition_penalty": "repeat_penalty", "min_p": "min_p"}

_SYSTEM, _USER, _USER2, _REPLY = "\x00S\x00", "\x00U\x00", "\x00V\x00", "\x00R\x00"


def render_jinja(template: str, messages: list[dict], generation: bool, specials: dict) -> str:
    """The chat template rendered as transformers' ``apply_chat_template`` renders it."""
    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=generation, **specials)


@dataclass
class ChatFormat:
    """The text a chat template puts around each message, read off marker renderings.

    A conversation renders as ``head``, then ``default_system`` when it has no system message, then
    per message ``<role>_prefix + content + <role>_suffix`` (no assistant suffix after a final
    assistant message, so Ollama continues it), then ``generation`` after a final non-assistant
    message. ``system_supported`` unset: the template refuses or drops system messages, and so does
    the translation. ``system_in_user`` set: the system text is not a turn of its own but is put at the start
    of the first user message, followed by ``system_suffix`` (Gemma's templates do this).
    """

    head: str
    default_system: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation: str
    system_in_user: bool = False
    system_supported: bool = True

    def render(self, messages: list[dict]) -> str:
        """The conversation as the Go template of ``go_template()`` renders it under Ollama."""
        messages = collate(messages)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        out = [self.head] + ([] if system else [self.default_system])
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] == "system":
                if self.system_supported and not self.system_in_user:
                    out += [self.system_prefix, m["content"], self.system_suffix]
            elif m["role"] == "user":
                folded = self.system_in_user and system and i == 1
                out += [self.user_prefix, system + self.system_suffix if folded else "", m["content"], self.user_suffix]
            elif m["role"] == "assistant":
                out += [self.assistant_prefix, m["content"], "" if last else self.assistant_suffix]
            if last and m["role"] != "assistant":
                out.append(self.generation)
        return "".join(out)

    def go_template(self) -> str:
        """The Go template Ollama executes (its ``.Messages`` form: every turn, not only the last)."""
        q = _go_literal
        system_text = f"{q(self.system_prefix)}{{{{ .Content }}}}{q(self.system_suffix)}" if self.system_supported else ""
        system_turn = "" if self.system_in_user else f'{{{{ if eq .Role "system" }}}}{system_text}{{{{ else }}}}'
        folded = (f"{{{{ if and $.System (eq $i 1) }}}}{{{{ $.System }}}}{q(self.system_suffix)}{{{{ end }}}}"
                  if self.system_in_user else "")
        return (
            f"{q(self.head)}{{{{ if not .System }}}}{q(self.default_system)}{{{{ end }}}}"
            "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            + system_turn
            + f'{{{{ if eq .Role "user" }}}}{q(self.user_prefix)}{folded}{{{{ .Content }}}}{q(self.user_suffix)}'
            f'{{{{ else if eq .Role "assistant" }}}}{q(self.assistant_prefix)}{{{{ .Content }}}}'
            f"{{{{ if not $last }}}}{q(self.assistant_suffix)}{{{{ end }}}}{{{{ end }}}}"
            + ("" if self.system_in_user else "{{ end }}")
            + f'{{{{ if and $last (ne .Role "assistant") }}}}{q(self.generation)}{{{{ end }}}}'
            "{{ end }}"
        )

    def stop_words(self, eos: str | None) -> list[str]:
        """What ends a reply: the end-of-turn text after an assistant message, the next user turn's
        opening, and the EOS token; each a single stripped line, in that order, without repeats."""
        words = [self.assistant_suffix.strip(), self.user_prefix.strip(), (eos or "").strip()]
        kept = []
        for word in words:
            if word and "\n" not in word and '"' not in word and word not in kept:
                kept.append(word)
        return kept


def collate(messages: list[dict]) -> list[dict]:
    """Consecutive messages of one role merged with a blank line, as Ollama does before rendering."""
    out: list[dict] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def _go_literal(text: str) -> str:
    """``text`` as literal Go template text (a ``{{`` in it would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def _between(text: str, start: str, end: str) -> str:
    return text[text.index(start) + len(start): text.index(end)]


def read_chat_format(template: str, specials: dict) -> ChatFormat | None:
    """The ``ChatFormat`` of a Jinja chat template, or None when the pieces cannot be told apart."""
    def render(messages, generation=False):
        return render_jinja(template, messages, generation, specials)

    user, reply, user2 = ({"role": "user", "content": _USER}, {"role": "assistant", "content": _REPLY},
                          {"role": "user", "content": _USER2})
    prompt = render([user], True)  # what Ollama renders: conversations that end on a user turn
    two_turns = render([user, reply, user2], True)
    ended, turn = render([user]), render([user, reply])  # some templates close a conversation (Phi-3: EOS)
    after_user = [prompt[prompt.index(_USER) + len(_USER):], _between(turn, _USER, _REPLY),
                  ended[ended.index(_USER) + len(_USER):]]
    user_suffix = os.path.commonprefix(after_user)
    generation = after_user[0][len(user_suffix):]
    assistant_prefix = after_user[1][len(user_suffix):]
    between_turns = _between(two_turns, _REPLY, _USER2)
    assistant_suffix = os.path.commonprefix([turn[turn.index(_REPLY) + len(_REPLY):], between_turns])
    user_prefix = between_turns[len(assistant_suffix):]
    before_user = prompt[: prompt.index(_USER)]
    if not before_user.endswith(user_prefix):
        return None
    head_without_system = before_user[: len(before_user) - len(user_prefix)]
    try:
        with_system = render([{"role": "system", "content": _SYSTEM}, user], True)
    except Exception:  # raise_exception("System role not supported") and the like
        with_system = ""
    if _SYSTEM not in with_system:  # refused or dropped: Ollama's system prompt is dropped too
        return ChatFormat(head_without_system, "", "", "", user_prefix, user_suffix, assistant_prefix,
                          assistant_suffix, generation, system_supported=False)
    before_system = with_system[: with_system.index(_SYSTEM)]
    after_system = _between(with_system, _SYSTEM, _USER)
    folded_head = before_system[: len(before_system) - len(user_prefix)]
    if user_prefix and before_system.endswith(user_prefix) and head_without_system.startswith(folded_head):
        return ChatFormat(folded_head, head_without_system[len(folded_head):], "", after_system, user_prefix,
                          user_suffix, assistant_prefix, assistant_suffix, generation, system_in_user=True)
    if not after_system.endswith(user_prefix):
        return None
    common = len(os.path.commonprefix([before_system, head_without_system]))  # a BOS; the rest: the default system turn
    return ChatFormat(before_system[:common], head_without_system[common:], before_system[common:],
                      after_system[: len(after_system) - len(user_prefix)], user_prefix, user_suffix,
                      assistant_prefix, assistant_suffix, generation)


def sample_conversations(system_supported: bool = True) -> list[list[dict]]:
    """Conversations a translation must render exactly as the chat template does (each ends on a user turn)."""
    system = [{"role": "system", "content": "You are terse.\nAnswer in one line."}]
    first = [{"role": "user", "content": "What is 2 + 2?"}]
    # No whitespace at either end of a message: some templates trim it (Gemma's), which Go cannot.
    turns = first + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "And  3 + 3?"}]
    conversations = [first, turns]
    if system_supported:
        conversations += [system + first, system + turns]
    return conversations


def ollama_template(template: str, specials: dict) -> ChatFormat | None:
    """The checked ``ChatFormat`` of ``template``, or None (logged) when it cannot be translated."""
    try:
        chat = read_chat_format(template, specials)
    except Exception as e:  # any template error means: leave the template to Ollama
        log.warning("the chat template could not be rendered for Ollama (%s); the Modelfile has no TEMPLATE", e)
        return None
    if chat is None:
        log.warning("the chat template's turns could not be told apart; the Modelfile has no TEMPLATE (Ollama "
                    "then picks one from the GGUF file's chat template)")
        return None
    for messages in sample_conversations(chat.system_supported):
        if chat.render(messages) != render_jinja(template, messages, True, specials):
            log.warning("the chat template renders some conversations in a way a per-role Ollama template cannot "
                        "reproduce; the Modelfile has no TEMPLATE (Ollama then picks one from the GGUF file's chat "
                        "template)")
            return None
    if '"""' in chat.go_template():
        log.warning('the chat template contains """, which a Modelfile cannot quote; the Modelfile has no TEMPLATE')
        return None
    return chat


def _adds_bos(gguf_file: Path) -> bool:
    field = gguf.GGUFReader(gguf_file).get_field("tokenizer.ggml.add_bos_token")
    return field is not None and bool(field.contents())


def write_modelfile(gguf_file: Path, tok_dir: Path, model_dir: Path | None = None) -> Path:
    """Write an Ollama ``Modelfile`` beside ``gguf_file``: FROM, TEMPLATE (when translatable), stop
    words and the sampling settings of the generation_config.json in ``tok_dir`` or ``model_dir``.

    When the GGUF file says to add a BOS token (``tokenizer.ggml.add_bos_token``), Ollama adds it to
    the rendered prompt itself, so the BOS text the chat template starts with is left out of TEMPLATE.
    """
    tok_dir = Path(tok_dir)
    config_path = tok_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    template = config.get("chat_template")
    if (tok_dir / "chat_template.jinja").exists():  # transformers 5 saves it there, and prefers it
        template = (tok_dir / "chat_template.jinja").read_text()
    if template is None:
        template = DEFAULT_CHAT_TEMPLATE
    specials = {k: token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    lines = [f"FROM ./{gguf_file.name}", ""]
    chat = ollama_template(template, specials) if isinstance(template, str) else None
    if chat is not None:
        bos = specials.get("bos_token")
        if bos and chat.head.startswith(bos) and _adds_bos(gguf_file):
            chat.head = chat.head[len(bos):]
        lines += [f'TEMPLATE """{chat.go_template()}"""', ""]
        stops = chat.stop_words(specials.get("eos_token"))
    else:
        stops = [specials["eos_token"]] if specials.get("eos_token") else []
    lines += [f'PARAMETER stop "{word}"' for word in stops]
    found = [d / "generation_config.json" for d in (tok_dir, model_dir) if d is not None
             and (Path(d) / "generation_config.json").exists()]
    if found:
        generation_config = Path(found[0])
        settings = json.loads(generation_config.read_text())
        if settings.get("do_sample", True):  # greedy models ship no sampling settings worth copying
            lines += [f"PARAMETER {name} {settings[key]}" for key, name in SAMPLING_PARAMETERS.items()
                      if isinstance(settings.get(key), (int, float)) and not isinstance(settings.get(key), bool)]
    path = gguf_file.with_name("Modelfile")
    path.write_text("\n".join(lines) + "\n")
    return path
