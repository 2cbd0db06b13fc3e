"""``qlora-lite eval``: loss, perplexity and exact-match of a model (plus adapter) on a data file or dataset."""

from __future__ import annotations

import json

import click

from qlora_lite.cli.options import config_options, with_defaults
from qlora_lite.errors import ConfigError
from qlora_lite.flag_values import parse_field_map


@click.command("eval")
@click.option("--model", "model", required=True, metavar="DIR",
              help="Base model folder (a merged model works too); `demo` is the bundled demo model.")
@click.option("--adapter", default=None, metavar="DIR", help="LoRA adapter folder (ours or PEFT's) to apply.")
@click.option("--data", "data", required=True, metavar="PATH",
              help="Data to score (alpaca, chat messages, ShareGPT or raw text, or prompt/chosen/rejected pairs): .jsonl, .json, .parquet, .csv, "
                   "a folder of Parquet shards or from datasets' save_to_disk, or a hub dataset id.")
@click.option("--bits", type=click.Choice(["4", "8", "16"]), default=None,
              help="Load the base in 4, 8 or 16 bits.  [default: the adapter's training bits, else 16]")
@config_options("format", "data_split", "data_config", "field_map", "max_seq_len", "skip_bad_lines", "quant_type",
                "double_quant", "trust_remote_code", "allow_bin_weights", "beta")
@click.option("--reference-adapter", default=None, metavar="DIR",
              help="Preference pairs: the reference of the reward metrics, e.g. the SFT adapter a DPO run "
                   "started from (its --adapter)  [default: the base, adapter off]")
@click.option("--limit", type=int, default=None, help="Score only the first N examples.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per forward pass.")
@click.option("--no-exact-match", "no_exact", is_flag=True,
              help="Skip the generation-based exact-match (loss and perplexity only; faster).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def command(model, adapter, data, bits, reference_adapter, limit, batch_size, no_exact, as_json, **flags):
    """Score MODEL (plus an adapter) on the examples of a data file or dataset.

    Reports the mean loss and perplexity of the response tokens. When the examples carry expected
    answers (alpaca `output`, the last assistant turn of a chat), each prompt is also answered by
    greedy generation and compared, stripped, with the expected answer: the exact-match rate.

    A file of preference pairs (prompt/chosen/rejected) reports the preference accuracy instead: how
    often the model gives the chosen response the higher log-probability, and DPO's reward accuracy
    and margin against the base with the adapter switched off, or against --reference-adapter (--beta
    scales the rewards).

    Example: qlora-lite eval --model demo --data qlora_lite/demo/data/eval.jsonl --json
    """
    flags = with_defaults(flags)
    from qlora_lite.inference.evaluate import (
        evaluate_jsonl,
        evaluate_pairs,
        is_preference_file,
        load_pairs,
        pair_logps,
    )
    from qlora_lite.inference.generate import load_for_inference
    from qlora_lite.model.folder import load_tokenizer

    if (limit is not None and limit < 1) or batch_size < 1:
        raise click.BadParameter("--limit and --batch-size must be at least 1")
    field_map, problems = parse_field_map(flags["field_map"])
    if problems:  # before the model loads
        raise ConfigError("; ".join(problems))
    if not flags["beta"] > 0:  # before the model is loaded
        raise click.BadParameter("--beta must be positive")
    source = dict(split=flags["data_split"], config_name=flags["data_config"], field_map=field_map)
    preference = is_preference_file(data, flags["format"], **source)
    if reference_adapter and not preference:
        raise click.BadParameter(f"--reference-adapter is for files of preference pairs; {data} holds other examples")

    def load(adapter_dir):
        return load_for_inference(
            model, adapter=adapter_dir, bits=int(bits) if bits else None, quant_type=flags["quant_type"],
            double_quant=flags["double_quant"], trust_remote_code=flags["trust_remote_code"],
            allow_bin_weights=flags["allow_bin_weights"])

    if preference:
        # the pairs first: a bad file fails before any model is loaded
        pairs = load_pairs(data, load_tokenizer(model, flags["trust_remote_code"]), max_seq_len=flags["max_seq_len"],
                           limit=limit, skip_bad_lines=flags["skip_bad_lines"], **source)
        reference = None
        if reference_adapter:  # one model at a time: the reference is scored, then freed
            ref_model, tokenizer = load(reference_adapter)
            reference = pair_logps(ref_model, pairs, tokenizer.pad_token_id, batch_size)
            del ref_model
        lm, tokenizer = load(adapter)
        result = {"data": str(data), **evaluate_pairs(lm, tokenizer, pairs, batch_size=batch_size, beta=flags["beta"],
                                                      reference=reference)}
        if reference_adapter:
            result["reference"] = f"adapter {reference_adapter}"
    else:
        lm, tokenizer = load(adapter)
        result = evaluate_jsonl(lm, tokenizer, data, fmt=flags["format"],
                                max_seq_len=flags["max_seq_len"], limit=limit, batch_size=batch_size,
                                exact=not no_exact, skip_bad_lines=flags["skip_bad_lines"],
                                split=flags["data_split"], config_name=flags["data_config"], field_map=field_map)
    result.update(model=model, adapter=adapter)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(format_result(result))


def format_result(result: dict) -> str:
    """A short human-readable report of ``evaluate_jsonl``'s result."""
    lines = [f"data        {result['data']} ({result['examples']} examples, format {result['format']})"]
    if result["format"] == "preference":
        return "\n".join(lines + [
            f"preference accuracy  {result['preference_accuracy']:.1%} (chosen response more likely than rejected)",
            f"reward accuracy      {result['eval_rewards/accuracies']:.1%} (against the reference: {result['reference']})",
            f"reward margin        {result['eval_rewards/margins']:.4f} (beta {result['beta']:g})",
            f"DPO loss             {result['eval_loss']:.4f}"])
    lines += [f"eval loss   {result['eval_loss']:.4f}",
             f"perplexity  {result['eval_ppl']:.3f}"]
    if "exact_match" in result:
        lines.append(f"exact match {result['exact_match']:.1%} ({result['correct']}/{result['total']})")
        for s in result["samples"][:3]:
            lines.append(f"  expected {s['expected']!r:40} got {s['got']!r}")
    return "\n".join(lines)
