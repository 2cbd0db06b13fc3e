"""``qlora-lite generate``: one streamed reply to --prompt, or an interactive chat on stdin."""

from __future__ import annotations

import math
import sys

import click

from qlora_lite.cli.options import config_options, with_defaults

EXIT_WORDS = ("exit", "quit", "/exit")


@click.command("generate")
@click.option("--model", "model", required=True, metavar="DIR",
              help="Base model folder (a merged model works too); `demo` is the bundled demo model.")
@click.option("--adapter", default=None, metavar="DIR", help="LoRA adapter folder (ours or PEFT's) to apply.")
@click.option("--bits", type=click.Choice(["4", "8", "16"]), default=None,
              help="Load the base in 4, 8 or 16 bits.  [default: the adapter's training bits, else 16]")
@config_options("quant_type", "double_quant", "trust_remote_code", "allow_bin_weights")
@click.option("--prompt", "-p", default=None, help="Reply to this message and exit; without it, chat on stdin.")
@click.option("--system", default=None, help="A system message placed before the conversation.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Longest reply in tokens.")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="Sampling temperature; 0 means greedy (deterministic) decoding.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling: keep this probability mass.")
@click.option("--top-k", type=int, default=50, show_default=True, help="Sample among the k most likely tokens.")
@click.option("--seed", type=int, default=None, help="Seed for sampling, for reproducible replies.")
@click.option("--raw", is_flag=True, help="Continue the prompt text as is, without the chat template.")
def command(model, adapter, bits, prompt, system, max_new_tokens, temperature, top_p, top_k, seed, raw, **flags):
    """Generate text from MODEL (plus an adapter), streaming tokens as they come.

    With --prompt, print one reply. Without it, read one message per line from stdin and keep the
    conversation, until end of input or `exit`. The model's chat template frames each turn.

    Example: qlora-lite generate --model demo --prompt "Repeat the words: red cat"
    """
    flags = with_defaults(flags)
    from qlora_lite.inference.generate import chat_prompt, generate_reply, load_for_inference, prompt_ids

    # written so that nan fails too (nan < 0 is False)
    if not (temperature >= 0 and math.isfinite(temperature)) or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1:
        raise click.BadParameter("need a finite --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0, "
                                 "--max-new-tokens >= 1")
    context = _context_length(model)
    if context is not None and max_new_tokens >= context:  # checked before minutes of loading
        raise click.BadParameter(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {context} "
                                 f"tokens (max_position_embeddings in its config.json) with any prompt; give at "
                                 f"most {context - 1}")
    lm, tokenizer = load_for_inference(
        model, adapter=adapter, bits=int(bits) if bits else None,
        quant_type=flags["quant_type"],
        double_quant=flags["double_quant"],
        trust_remote_code=flags["trust_remote_code"], allow_bin_weights=flags["allow_bin_weights"],
    )
    sample = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    history = [{"role": "system", "content": system}] if system else []

    def reply(message: str) -> str:
        messages = history + [{"role": "user", "content": message}]
        if raw:
            ids = prompt_ids(tokenizer, message, "text")
        else:
            ids = prompt_ids(tokenizer, chat_prompt(tokenizer, _fit(tokenizer, messages, lm, max_new_tokens)))
        limit = getattr(lm.config, "max_position_embeddings", None)
        if limit is not None and len(ids) + max_new_tokens > limit:
            room = (f"shorten the prompt or give --max-new-tokens at most {limit - len(ids)}" if len(ids) < limit
                    else "shorten the prompt")
            raise click.ClickException(f"the prompt is {len(ids)} tokens, and with --max-new-tokens {max_new_tokens} "
                                       f"it exceeds the model's context of {limit} tokens; {room}")
        answer = generate_reply(lm, tokenizer, ids, stream=True, **sample)
        history.extend([{"role": "user", "content": message}, {"role": "assistant", "content": answer}])
        return answer

    if prompt is not None:
        reply(prompt)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo("Chatting with the model; type `exit` or press Ctrl-D to stop.", err=True)
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line or line.strip() in EXIT_WORDS:
            break
        if line.strip():
            reply(line.strip())


def _fit(tokenizer, messages: list[dict], model, max_new_tokens: int) -> list[dict]:
    """Drop the oldest turns (keeping a system message) until prompt + reply fit the model's context."""
    from qlora_lite.inference.generate import chat_prompt

    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while len(turns) > 1:
        n_tokens = len(tokenizer(chat_prompt(tokenizer, system + turns), add_special_tokens=False)["input_ids"])
        if n_tokens + max_new_tokens <= limit:
            break
        turns = turns[2:] if len(turns) > 2 else turns[-1:]
    return system + turns


def _context_length(model: str) -> int | None:
    """The model's context in tokens from its config.json alone (None when it does not say)."""
    from qlora_lite.model.folder import read_json_file, resolve_model_dir

    config = read_json_file(resolve_model_dir(model) / "config.json")
    value = config.get("max_position_embeddings") or config.get("n_positions")
    return value if isinstance(value, int) and value > 0 else None
