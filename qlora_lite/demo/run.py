"""The offline demo: the whole pipeline on the bundled demo model and dataset, in a few minutes on a CPU.

1. evaluate the 4-bit base on the held-out set (exact-match and loss);
2. fine-tune LoRA on the 4-bit base (gradient checkpointing, 8-bit optimizer) through ``train.loop.train``;
3. evaluate base + adapter again;
4. merge the adapter into the dequantized base, reload the merged folder with plain transformers and
   check that it gives the same answers; write a GGUF file;
5. summarize, with the paths of everything written.

The skill taught is word reversal ("Reverse the words: red big cat" -> "cat big red"), which the base
model never saw; tools/build_demo_model.py builds the model and the data.
"""

from __future__ import annotations

import gc
import json
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from qlora_lite.config import DEMO_DATA, DEMO_MODEL, load_config
from qlora_lite.data.formats import read_jsonl
from qlora_lite.data.tokenize import render_example
from qlora_lite.errors import DemoError
from qlora_lite.gguf.writer import export_gguf
from qlora_lite.inference.evaluate import evaluate_jsonl, exact_match
from qlora_lite.inference.generate import load_for_inference
from qlora_lite.merge.write import merge_adapter
from qlora_lite.model.loading import DTYPES
from qlora_lite.model.precision import resolve_compute_dtype
from qlora_lite.storage.output_dir import check_writable
from qlora_lite.train.loop import train

MARKER = ".qlora-lite-demo"


# Folders and files the demo writes; only these are removed when a previous demo run is replaced.
DEMO_OUTPUTS = ("train", "merged", ".merged.partial", "merged.failed", "demo.gguf", "summary.json", MARKER)


@dataclass
class DemoSettings:
    """Knobs of the demo; the defaults are the measured full run, small values make a quick check."""

    output: Path = Path("qlora-lite-demo")
    model: Path = DEMO_MODEL
    data_dir: Path = DEMO_DATA
    max_steps: int = 100
    eval_limit: int | None = None
    batch_size: int = 8
    lr: float = 3e-3
    rank: int = 16
    seed: int = 0
    gguf: bool = True
    threads: int | None = 1


@dataclass
class DemoResult:
    """Measured results and written paths (also saved as ``summary.json``)."""

    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    merged: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    train_steps: int = 0
    peak_rss_mb: float = 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def prepare_output(output: Path) -> None:
    """Use ``output`` for a new demo run: new, empty, or holding a previous demo run (replaced).

    Raises:
        DemoError: the folder holds anything that a demo run did not write.
        OutputError: nothing can be written there.
    """
    check_writable(output)
    if output.exists():
        if not output.is_dir():
            raise DemoError(f"--output {output} is a file; choose a folder")
        entries = list(output.iterdir())
        if entries and not (output / MARKER).exists():
            raise DemoError(f"--output {output} is not empty and was not written by `qlora-lite demo`; "
                            "choose a new folder (nothing was deleted)")
        foreign = [p.name for p in entries if p.name not in DEMO_OUTPUTS]
        if foreign:
            raise DemoError(f"--output {output} holds files the demo did not write ({', '.join(foreign[:5])}); "
                            "move them or choose a new folder (nothing was deleted)")
        for p in entries:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).write_text("written by qlora-lite demo; the next demo run replaces this folder\n")


def evaluate_model(model_path: str, eval_file: Path, limit: int | None, *, adapter: str | None = None,
                   bits: int = 4) -> tuple[dict, list[str]]:
    """Loss, perplexity and exact-match of base (+ adapter) on ``eval_file``; also every greedy answer.

    Returns:
        ``(metrics, answers)``; answers are the model's greedy replies to the first ``limit`` prompts.
    """
    model, tokenizer = load_for_inference(model_path, adapter=adapter, bits=bits)
    metrics = evaluate_jsonl(model, tokenizer, eval_file, fmt="chat", max_seq_len=128, limit=limit, keep_answers=True)
    del model
    gc.collect()
    return metrics, metrics.pop("answers")


def train_adapter(settings: DemoSettings, train_file: Path, eval_file: Path):
    """Fine-tune on the 4-bit demo base through the normal training entry point; returns TrainResult."""
    config = load_config(overrides=dict(
        model=str(settings.model), bits=4, data=str(train_file), eval_data=str(eval_file), format="chat",
        max_seq_len=64, rank=settings.rank, alpha=2.0 * settings.rank, dropout=0.0,
        output=str(settings.output / "train"), batch_size=settings.batch_size, lr=settings.lr,
        max_steps=settings.max_steps, warmup_steps=min(10, settings.max_steps // 10), lr_scheduler="cosine",
        optimizer="paged_adamw_8bit", gradient_checkpointing=True, seed=settings.seed,
        logging_steps=max(1, settings.max_steps // 50),
    ))
    return train(config)


def reload_merged(merged_dir: Path, eval_file: Path, limit: int | None) -> dict:
    """Exact-match of the merged folder loaded with plain transformers (no qlora-lite code in the model).

    Returns:
        ``inference.evaluate.exact_match``'s result, every answer included (same prompts and lengths as the
        adapter's evaluation, so answers can be compared one to one).
    """
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    dtype = DTYPES[resolve_compute_dtype("auto")]  # what this device runs fast
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    records = [r for _, r in read_jsonl(eval_file)[0]][:limit]
    return exact_match(model, tokenizer, [render_example(r, tokenizer, "chat") for r in records])


def merge_and_check(model_dir: Path, adapter_dir: Path, output: Path, eval_file: Path, limit: int | None,
                    adapter_answers: list[str]) -> dict:
    """Merge into ``output/merged`` (verified on a probe), reload it with plain transformers, and
    compare its greedy answers with base + adapter's, one by one.

    Returns:
        ``{"same_answers", "total", "exact_match", "correct", "max_abs_logit_diff"}``.
    """
    report = merge_adapter(model_dir, adapter_dir, output / "merged", progress=False, overwrite=True)
    merged = reload_merged(output / "merged", eval_file, limit)
    same = sum(a == b for a, b in zip(adapter_answers, merged.pop("answers")))
    return {"same_answers": same, "total": merged["total"], "exact_match": merged["exact_match"],
            "correct": merged["correct"], "max_abs_logit_diff": report.max_abs_logit_diff}


def run_demo(settings: DemoSettings, echo: Callable[[str], None] = print) -> DemoResult:
    """Run the five steps; ``echo`` prints progress lines. Returns the DemoResult (saved as summary.json).

    Raises:
        DemoError, and the errors of the steps (ModelLoadError, DataError, MergeError, ...).
    """
    model_dir = settings.model
    train_file, eval_file = settings.data_dir / "train.jsonl", settings.data_dir / "eval.jsonl"
    for needed in (model_dir / "config.json", train_file, eval_file):
        if not needed.exists():
            raise DemoError(f"bundled demo file {needed} is missing; reinstall qlora-lite or rebuild it with "
                            "`python3 tools/build_demo_model.py`")
    output, result, clock = settings.output, DemoResult(), time.time()
    prepare_output(output)

    if settings.threads and not torch.cuda.is_available():
        # The demo model's matrices are tiny: a second thread buys little, and on a busy CPU the
        # threads' barriers make each of the thousands of small ops per step wait for a time slice.
        torch.set_num_threads(settings.threads)

    hf_logging.disable_progress_bar()  # "Loading weights" bars of every reload would drown the story

    echo(f"[1/5] evaluating the 4-bit base model {model_dir} on the held-out set ...")
    result.before, _ = evaluate_model(str(model_dir), eval_file, settings.eval_limit)
    echo(f"      base: exact match {_pct(result.before)}, eval loss {result.before['eval_loss']:.3f}")
    _show_samples(result.before, eval_file, echo)
    result.seconds["eval_before"] = _lap(clock)

    echo(f"[2/5] fine-tuning LoRA r={settings.rank} on the 4-bit base for {settings.max_steps} steps ...")
    trained = train_adapter(settings, train_file, eval_file)
    result.train_steps = trained.steps
    result.seconds["train"] = _lap(clock, result.seconds)

    echo("[3/5] evaluating base + adapter ...")
    result.after, adapter_answers = evaluate_model(str(model_dir), eval_file, settings.eval_limit,
                                                   adapter=str(trained.adapter_dir))
    echo(f"      tuned: exact match {_pct(result.after)} (was {_pct(result.before)}), "
         f"eval loss {result.after['eval_loss']:.3f} (was {result.before['eval_loss']:.3f})")
    _show_samples(result.after, eval_file, echo)
    result.seconds["eval_after"] = _lap(clock, result.seconds)

    echo("[4/5] merging the adapter into the dequantized base, reloading it with plain transformers ...")
    result.merged = merge_and_check(model_dir, trained.adapter_dir, output, eval_file, settings.eval_limit,
                                    adapter_answers)
    m = result.merged
    echo(f"      merged model (plain transformers): same answer as base + adapter on {m['same_answers']}/{m['total']}"
         f" prompts, exact match {_pct(m)}; max |logit diff| on the probe {m['max_abs_logit_diff']:.3g}")
    result.paths = {"adapter": str(trained.adapter_dir), "merged model": str(output / "merged"),
                    "metrics": str(trained.metrics_path), "loss plot": str(trained.plot_path)}
    if settings.gguf:
        export_gguf(output / "merged", output / "demo.gguf", overwrite=True, progress=False)  # our own file
        result.paths["gguf"] = str(output / "demo.gguf")
    result.seconds["merge_export"] = _lap(clock, result.seconds)
    result.seconds["total"] = round(time.time() - clock, 1)
    result.peak_rss_mb = round(peak_rss_mb(), 1)
    result.paths["summary"] = str(output / "summary.json")
    (output / "summary.json").write_text(json.dumps(asdict(result), indent=2, default=str))
    echo("[5/5] done")
    echo(summary_table(result))
    return result


def _lap(start: float, done: dict | None = None) -> float:
    """Seconds since ``start`` not yet attributed to earlier steps."""
    return round(time.time() - start - sum((done or {}).values()), 1)


def _pct(metrics: dict) -> str:
    return f"{metrics['exact_match']:.0%} ({metrics['correct']}/{metrics['total']})"


def _show_samples(metrics: dict, eval_file: Path, echo: Callable[[str], None], n: int = 2) -> None:
    """Print the first ``n`` questions with the model's and the expected answer."""
    with open(eval_file) as f:
        questions = [json.loads(next(f))["messages"][0]["content"] for _ in range(min(n, len(metrics["samples"])))]
    for question, s in zip(questions, metrics["samples"]):
        echo(f"        {question!r} -> {s['got']!r} (expected {s['expected']!r})")


def summary_table(result: DemoResult) -> str:
    """A plain-text summary: metrics before/after, merge check, time, memory, and the written paths."""
    b, a = result.before, result.after
    rows = [("", "base (4-bit)", "base + LoRA"),
            ("exact match", _pct(b), _pct(a)),
            ("eval loss", f"{b['eval_loss']:.3f}", f"{a['eval_loss']:.3f}"),
            ("perplexity", f"{b['eval_ppl']:.2f}", f"{a['eval_ppl']:.2f}")]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, width)).rstrip() for row in rows]
    m = result.merged
    lines += ["", f"merged model (plain transformers): exact match {_pct(m)}, "
              f"same answer as base + LoRA on {m['same_answers']}/{m['total']}",
              f"training steps {result.train_steps}; time {result.seconds.get('total', 0):.0f} s "
              f"(train {result.seconds.get('train', 0):.0f} s); peak memory {result.peak_rss_mb:.0f} MB", ""]
    lines += [f"{name:13} {path}" for name, path in result.paths.items()]
    return "\n".join(lines)
