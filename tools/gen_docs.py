"""Generate the documentation that is derived from code, so it cannot drift from it.

* README.md: the configuration reference between the ``config-reference`` markers, from
  ``config.reference_markdown()`` (the dataclass help texts).
* examples/*.yaml: commented training configs; every key's comment is its config field help text.
* examples/data/demo_*.csv: the demo data as a spreadsheet would export it (question, answer columns),
  for examples/demo-csv.yaml.

    python3 tools/gen_docs.py            # rewrite both
    python3 tools/gen_docs.py --check    # exit 1 and name the stale files (used by the tests)
    python3 tools/gen_docs.py --estimates  # recompute the memory estimates quoted in the YAML headers
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_lite.config import SECTIONS, reference_markdown  # noqa: E402

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"

# Architecture facts of the public models (from their config.json), for `--estimates` only.
ARCHS = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True, head_dim=64),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False),
}

COMMON = dict(bits=4, quant_type="nf4", double_quant=True, dropout=0.05, target_modules="all-linear",
              data="data/train.jsonl", eval_fraction=0.02, format="auto", lr=2e-4, warmup_steps=20, epochs=2.0,
              max_steps=0, lr_scheduler="cosine", optimizer="paged_adamw_8bit", gradient_checkpointing=True,
              save_steps=200, eval_steps=200, save_total_limit=3, logging_steps=10)

# name -> (title, hub id, estimate quoted in the header, settings beyond COMMON)
EXAMPLES = {
    "llama-3.2-1b-8gb": ("Llama 3.2 1B Instruct on an 8 GB GPU", "meta-llama/Llama-3.2-1B-Instruct", "2.4 GiB",
                         dict(max_seq_len=2048, batch_size=2, grad_accum=8, rank=16, alpha=32.0)),
    "qwen2.5-0.5b-8gb": ("Qwen2.5 0.5B Instruct on an 8 GB GPU", "Qwen/Qwen2.5-0.5B-Instruct", "1.4 GiB",
                         dict(max_seq_len=2048, batch_size=2, grad_accum=8, rank=32, alpha=64.0)),
    "mistral-7b-8gb": ("Mistral 7B Instruct v0.3 on an 8 GB GPU", "mistralai/Mistral-7B-Instruct-v0.3", "5.6 GiB",
                       dict(max_seq_len=1024, batch_size=1, grad_accum=16, rank=16, alpha=32.0)),
    "qwen2.5-7b-16gb": ("Qwen2.5 7B Instruct on a 16 GB GPU", "Qwen/Qwen2.5-7B-Instruct", "7.6 GiB",
                        dict(max_seq_len=2048, batch_size=1, grad_accum=16, rank=16, alpha=32.0, lr=1e-4)),
    "mistral-7b-16gb": ("Mistral 7B Instruct v0.3 on a 16 GB GPU", "mistralai/Mistral-7B-Instruct-v0.3", "12.5 GiB",
                        dict(max_seq_len=2048, batch_size=4, grad_accum=4, rank=32, alpha=64.0, lr=1e-4)),
    "qwen2.5-7b-24gb": ("Qwen2.5 7B Instruct on a 24 GB GPU", "Qwen/Qwen2.5-7B-Instruct", "11.0 GiB",
                        dict(max_seq_len=2048, batch_size=3, grad_accum=5, rank=32, alpha=64.0, lr=1e-4)),
    "mistral-7b-24gb": ("Mistral 7B Instruct v0.3 on a 24 GB GPU", "mistralai/Mistral-7B-Instruct-v0.3", "16.8 GiB",
                        dict(max_seq_len=4096, batch_size=3, grad_accum=5, rank=64, alpha=128.0, lr=1e-4)),
}

# The bundled demo, trainable from a checkout: `qlora-lite train --config examples/demo.yaml`. Its data
# paths are relative to examples/ (read beside the YAML file), so the command works from any folder.
DEMO = ("The bundled demo model and data (CPU, about a minute)", "demo", "well under 1 GB (CPU RSS)",
        dict(data="data/demo_train.jsonl", eval_data="data/demo_eval.jsonl", eval_fraction=0.0,
             format="chat", max_seq_len=64, batch_size=8, grad_accum=1, rank=16, alpha=32.0, dropout=0.0, lr=2e-3,
             max_steps=200, epochs=1.0, warmup_steps=10, save_steps=0, eval_steps=0, save_total_limit=0,
             logging_steps=5, output="runs/demo"))

# Preference tuning after the demo's SFT: DPO from the runs/demo adapter on pairs derived from the demo
# data (tools/make_demo_pairs.py), then merge and GGUF. The header lists the whole path.
DPO = ("Preference tuning (DPO) of the demo's SFT adapter, then merge and GGUF (CPU, a few minutes)", "demo",
       "well under 1 GB (CPU RSS)",
       dict(data="data/demo_pairs_train.jsonl", eval_data="data/demo_pairs_eval.jsonl", eval_fraction=0.0,
            format="preference", method="dpo", beta=0.1, adapter="runs/demo", max_seq_len=64, batch_size=8,
            grad_accum=1, rank=16, alpha=32.0, dropout=0.0, lr=2e-4, max_steps=50, epochs=1.0, warmup_steps=5,
            save_steps=0, eval_steps=25, save_total_limit=0, logging_steps=5, output="runs/demo-dpo"))
DPO_STEPS = [
    "The whole path, from the folder you run the demo config in:",
    "  1. SFT:   qlora-lite train --config examples/demo.yaml                 (adapter in runs/demo)",
    "  2. DPO:   qlora-lite train --config examples/dpo.yaml                  (starts from runs/demo)",
    "  3. Check: qlora-lite eval --model demo --adapter runs/demo-dpo --reference-adapter runs/demo \\",
    "                --data examples/data/demo_pairs_eval.jsonl",
    "  4. Merge: qlora-lite merge --model demo --adapter runs/demo-dpo --output runs/demo-dpo-merged",
    "  5. GGUF:  qlora-lite export-gguf --model runs/demo-dpo-merged --output runs/demo-dpo.gguf",
    "The reference of this DPO run is the SFT adapter it starts from (scored once, before the first step).",
]

# The same demo from a spreadsheet export: columns named question/answer, read through --field-map (as
# alpaca records, whose prompt template needs the longer sequences).
DEMO_CSV = ("The bundled demo model on the demo data as CSV columns question/answer (--field-map)", "demo",
            "well under 1 GB (CPU RSS)",
            {**DEMO[3], "data": "data/demo_train.csv", "eval_data": "data/demo_eval.csv", "format": "auto",
             "field_map": "instruction=question,output=answer", "output": "runs/demo-csv", "max_seq_len": 160})


def demo_csv(split: str) -> str:
    """examples/data/demo_{split}.jsonl (one user and one assistant turn each) as question,answer CSV."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["question", "answer"])
    for line in (ROOT / "examples" / "data" / f"demo_{split}.jsonl").read_text().splitlines():
        user, assistant = json.loads(line)["messages"]
        writer.writerow([user["content"], assistant["content"]])
    return out.getvalue()


def field_comment(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    return f.metadata["help"] + (f" One of: {', '.join(map(str, choices))}." if choices else "")


def yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and all(c.isalnum() or c in "-_./" for c in value) else repr(value)
    return repr(value)


def example_yaml(name: str, title: str, model: str, estimate: str, settings: dict, notes: tuple = ()) -> str:
    """One commented YAML config: a header, then every field of every section with its help as comment."""
    values = {**COMMON, "output": f"runs/{name}", "model": model, **settings}
    lines = [f"# {title}.", f"# Peak memory estimated by `qlora-lite estimate`: {estimate}.",
             f"# Run: qlora-lite train --config examples/{name}.yaml   (flags override any value below)",
             *(f"# {note}" for note in notes),
             "# Generated by tools/gen_docs.py from the config field help; edit a copy for your own runs.", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:  # {cls.__doc__.strip()}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  # {field_comment(f)}")
            lines.append(f"  {f.name}: {yaml_value(values.get(f.name, default))}")
        lines.append("")
    return "\n".join(lines)


def expected_files() -> dict[Path, str]:
    files = {ROOT / "examples" / f"{name}.yaml": example_yaml(name, *spec) for name, spec in EXAMPLES.items()}
    files[ROOT / "examples" / "demo.yaml"] = example_yaml("demo", *DEMO)
    files[ROOT / "examples" / "dpo.yaml"] = example_yaml("dpo", *DPO, notes=DPO_STEPS)
    files[ROOT / "examples" / "demo-csv.yaml"] = example_yaml("demo-csv", *DEMO_CSV)
    for split in ("train", "eval"):
        files[ROOT / "examples" / "data" / f"demo_{split}.csv"] = demo_csv(split)
    readme = (ROOT / "README.md").read_text()
    if START in readme and END in readme:
        head, rest = readme.split(START, 1)
        tail = rest.split(END, 1)[1]
        readme = f"{head}{START}\n{reference_markdown()}\n{END}{tail}"
    files[ROOT / "README.md"] = readme
    return files


def print_estimates() -> None:
    from qlora_lite.train.estimate import estimate_memory

    for name, (_, _, quoted, s) in EXAMPLES.items():
        arch = ARCHS[name.rsplit("-", 1)[0]]
        e = estimate_memory(arch, bits=4, seq_len=s["max_seq_len"], batch_size=s["batch_size"], rank=s["rank"],
                            device="cuda")
        print(f"{name:20} {e.total / 2**30:5.1f} GiB (quoted: {quoted})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a file is stale")
    parser.add_argument("--estimates", action="store_true", help="print the memory estimates of the examples")
    args = parser.parse_args()
    if args.estimates:
        print_estimates()
        return 0
    stale = [path for path, text in expected_files().items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date; run python3 tools/gen_docs.py")
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(expected_files()[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
