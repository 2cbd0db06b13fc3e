"""The configuration tree: one dataclass per stage, filled from a YAML file and command-line flags.

Every field documents itself through ``metadata["help"]``; the CLI options, their ``--help`` text
and the README's configuration reference are all generated from these definitions, so they cannot
drift apart. Validation collects every problem and raises once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

from qlora_lite.errors import ConfigError
from qlora_lite.flag_values import FIELD_TARGETS, TRACKERS, parse_field_map, report_targets

# The bundled demo (``--model demo``): a model and its data, shipped inside the package.
DEMO_MODEL = Path(__file__).resolve().parent / "demo" / "model"
DEMO_DATA = Path(__file__).resolve().parent / "demo" / "data"

def _opt(default: Any, help: str, choices: tuple | None = None, flag: str | None = None) -> Any:
    """A dataclass field carrying its help text, allowed values and (optional) CLI flag spelling."""
    meta = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """Which base model to load and how to quantize it."""

    model: str | None = _opt(None, "Base model: a local Hugging Face folder, demo (the bundled demo model), or a hub id when online.")
    bits: int = _opt(4, "Bits of the frozen base: 4 (QLoRA), 8 (LLM.int8) or 16 (plain LoRA).", (4, 8, 16))
    quant_type: str = _opt("nf4", "4-bit data type: nf4 (normal float, best for weights) or fp4.", ("nf4", "fp4"))
    double_quant: bool = _opt(True, "Quantize the 4-bit scales too (saves about 0.4 bits per weight).")
    compute_dtype: str = _opt(
        "auto",
        "Dtype of the matmuls, activations and unquantized layers. auto: what this device runs fast (bf16 on "
        "GPUs with bf16, else fp16; on the CPU bf16 only with AVX512-BF16 or AMX, else fp32), said in the log.",
        ("auto", "bf16", "fp16", "fp32"),
    )
    trust_remote_code: bool = _opt(False, "Run Python code shipped inside the model folder. Only for folders you trust.")
    allow_bin_weights: bool = _opt(
        False, "Accept a model folder with only pickle-based .bin weights (loaded with weights_only=True)."
    )


@dataclass
class LoraConfig:
    """The low-rank adapters that are trained."""

    rank: int = _opt(16, "LoRA rank r: the width of the low-rank update.")
    alpha: float = _opt(32.0, "LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with --rslora).")
    dropout: float = _opt(0.05, "Dropout on the adapter input during training.")
    target_modules: str = _opt(
        "all-linear", "Layers to adapt: comma-separated module-name suffixes (q_proj,v_proj) or all-linear."
    )
    rslora: bool = _opt(False, "Rank-stabilized scaling alpha/sqrt(r) instead of alpha/r.")
    dora: bool = _opt(False, "DoRA: also learn a magnitude per output channel of each adapted layer (PEFT's "
                             "use_dora); often closer to full fine-tuning at the same rank, for a slower step.")
    lora_dtype: str = _opt(
        "auto", "Dtype of the adapter weights A and B while training; auto: the compute dtype (fp32 under fp16).",
        ("auto", "bf16", "fp16", "fp32"),
    )
    adapter: str | None = _opt(None, "Start from an existing adapter folder (ours or PEFT's) instead of a fresh one.")


@dataclass
class DataConfig:
    """Training and evaluation data."""

    data: str | None = _opt(
        None, "Training data (alpaca, chat messages, ShareGPT conversations or raw text; preference pairs "
        "prompt/chosen/rejected in JSONL for --method dpo or orpo): a .jsonl, .json (array "
        "of records), .parquet, .csv or .tsv file, a folder of Parquet shards or written by datasets' "
        "save_to_disk, or a hub dataset id (online, or in the datasets cache).")
    eval_data: str | None = _opt(None, "Held-out data for evaluation, in any form --data takes.")
    data_split: str = _opt(
        "train", "Split to read from a hub dataset, a save_to_disk DatasetDict folder or a folder of split-named "
        "Parquet shards.")
    eval_split: str | None = _opt(
        None, "Split of --eval-data (default: --data-split), e.g. --data org/name --eval-data org/name "
        "--eval-split test.")
    data_config: str | None = _opt(None, "Configuration (subset) of a hub dataset that has several.")
    field_map: str | None = _opt(
        None, "Read fields from columns of other names: FIELD=COLUMN,... (e.g. output=answer,instruction=question); "
        "in YAML also a mapping. FIELD is one of " + ", ".join(FIELD_TARGETS) + ".")
    eval_fraction: float = _opt(0.0, "Hold out this fraction of --data for evaluation when --eval-data is not given.")
    format: str = _opt("auto", "Data format; auto detects it from the fields.",
                       ("auto", "alpaca", "chat", "text", "preference"))
    max_seq_len: int = _opt(512, "Longest sequence in tokens; longer examples are truncated or dropped. Preference "
                                 "pairs: prompt plus each response; the prompt is kept whole and the response cut "
                                 "(a prompt of --max-seq-len tokens or more is a bad line).")
    drop_long: bool = _opt(False, "Drop examples longer than --max-seq-len instead of truncating them (a preference "
                                  "pair is dropped when either response would be cut).")
    packing: bool = _opt(False, "Pack several examples into each sequence (no attention across examples).")
    train_on_inputs: bool = _opt(False, "Also compute the loss on the prompt, not only on the response.")
    data_cache: str = _opt(
        "auto", "Folder of the tokenized-data cache (safetensors, no pickle): a second run on the same data, "
        "tokenizer, template and settings starts without tokenizing. auto: $QLORA_LITE_CACHE, else "
        "~/.cache/qlora-lite/tokenized ($XDG_CACHE_HOME respected); none: no cache.")
    skip_bad_lines: bool = _opt(
        False, "Skip malformed records (JSONL lines, Parquet/CSV rows) and report them instead of stopping.")


@dataclass
class TrainConfig:
    """The optimization loop, checkpoints and logging."""

    output: str | None = _opt(None, "Output folder: adapter, checkpoints, metrics.jsonl and loss plot.")
    method: str = _opt(
        "sft",
        "Training objective: sft (next-token loss on the responses), dpo (direct preference optimization on "
        "prompt/chosen/rejected pairs, against the base with the adapters off, or the --adapter you start from, "
        "as the reference) or orpo (odds-ratio preference term plus the SFT loss on chosen; no reference).",
        ("sft", "dpo", "orpo"),
    )
    beta: float = _opt(0.1, "DPO: strength of the pull towards the reference (TRL's beta); lower lets the "
                            "policy move further. The rewards logged are beta * (log-prob - reference log-prob).")
    dpo_loss: str = _opt("sigmoid", "DPO loss (TRL's loss_type): sigmoid (the DPO paper) or ipo (squared, on "
                                    "per-token log-prob ratios; beta is IPO's tau).", ("sigmoid", "ipo"))
    label_smoothing: float = _opt(0.0, "DPO sigmoid: assumed fraction of pairs whose labels are flipped "
                                       "(conservative DPO), in [0, 0.5).")
    orpo_lambda: float = _opt(0.1, "ORPO: weight of the odds-ratio term added to the SFT loss on chosen (TRL's "
                                   "beta of ORPOConfig, the paper's lambda).")
    batch_size: int = _opt(1, "Sequences per micro-batch (per process).")
    grad_accum: int = _opt(1, "Micro-batches accumulated before each optimizer step.")
    lr: float = _opt(2e-4, "Peak learning rate.")
    weight_decay: float = _opt(0.0, "AdamW weight decay on the adapter weights.")
    lora_plus_ratio: float = _opt(
        1.0, "LoRA+: train the B matrices at this many times --lr (A and the rest at --lr); 1 is plain LoRA, "
             "the LoRA+ paper uses 16 (then a smaller --lr).")
    max_grad_norm: float = _opt(1.0, "Clip the gradient norm to this value (0 disables clipping).")
    max_steps: int = _opt(0, "Optimizer steps to run; 0 means run --epochs epochs.")
    epochs: float = _opt(1.0, "Passes over the training data (used when --max-steps is 0).")
    warmup_steps: int = _opt(0, "Linear warmup steps before the schedule.")
    lr_scheduler: str = _opt("cosine", "Learning-rate schedule after warmup.", ("cosine", "linear", "constant"))
    optimizer: str = _opt(
        "paged_adamw_8bit",
        "Optimizer; paged ones fall back to non-paged on the CPU.",
        ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw"),
    )
    gradient_checkpointing: bool = _opt(True, "Recompute activations in the backward pass to save memory.")
    checkpoint_policy: str = _opt(
        "auto",
        "What checkpointing keeps instead of recomputing: memory (nothing), balanced (attention and "
        "down-projection outputs), speed (every projection output: no big matmul is recomputed); auto "
        "picks the fastest whose estimated peak (qlora-lite estimate) takes at most half the free RAM "
        "(75% of the free GPU memory), and trains without checkpointing where it would barely lower the "
        "peak (small models, short sequences).",
        ("auto", "memory", "balanced", "speed"),
    )
    save_steps: int = _opt(0, "Write a resumable checkpoint every N steps (0: only at the end).")
    eval_steps: int = _opt(0, "Evaluate every N steps (0: only at the end).")
    save_total_limit: int = _opt(0, "Keep only the newest N checkpoints (0: keep all).")
    logging_steps: int = _opt(1, "Write a metrics.jsonl line every N steps.")
    report_to: str = _opt(
        "none", "Also send the metrics (and the config) to: none, or a comma-separated list of " +
        ", ".join(TRACKERS) + " (each needs its package: pip install 'qlora-lite[tensorboard]', "
        "'qlora-lite[wandb]', 'qlora-lite[mlflow]'). Logs land in --output/tracking; W&B runs offline "
        "without network.")
    seed: int = _opt(42, "Random seed for initialization, shuffling and dropout.")
    resume: bool = _opt(False, "Continue from the newest complete checkpoint in --output.")
    num_processes: int = _opt(1, "Processes to launch through accelerate (one per GPU; gloo on the CPU).")
    fsdp: bool = _opt(False, "With several processes, shard the frozen base over them (FSDP) instead of a "
                             "whole copy per process (DDP): for models too large for one device.")


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class Config:
    """The whole run: one section per stage of the data flow."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (readable, and loadable again with --config)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self, required: tuple[str, ...] = ()) -> Config:
        """Check every value; raise one ConfigError listing all problems. Returns self."""
        problems = []
        for dotted in required:
            section, name = dotted.split(".")
            if getattr(getattr(self, section), name) in (None, ""):
                problems.append(f"{option_name(name)} is required")
        for section_name in SECTIONS:
            section = getattr(self, section_name)
            for f in dataclasses.fields(section):
                choices = f.metadata.get("choices")
                value = getattr(section, f.name)
                if choices and value not in choices:
                    problems.append(f"{option_name(f.name)}={value!r} is not one of {', '.join(map(str, choices))}")
        # "x > 0" holds for inf and nan fails every range: each float is first checked to be finite
        # (reported once, so the range checks below skip non-finite values)
        def unfit(x: float) -> bool:
            return not math.isfinite(x)

        problems += [f"{option_name(f.name)} must be a finite number, got {getattr(section, f.name)}"
                     for section in (self.lora, self.data, self.train) for f in dataclasses.fields(section)
                     if field_type(f) is float and not math.isfinite(getattr(section, f.name))]
        checks = [
            (self.lora.rank >= 1, "--rank must be at least 1"),
            (unfit(self.lora.alpha) or self.lora.alpha > 0, "--alpha must be positive"),
            (unfit(self.lora.dropout) or 0.0 <= self.lora.dropout < 1.0, "--dropout must be in [0, 1)"),
            (self.data.max_seq_len >= 8, "--max-seq-len must be at least 8"),
            (unfit(self.data.eval_fraction) or 0.0 <= self.data.eval_fraction < 1.0,
             "--eval-fraction must be in [0, 1)"),
            (self.train.batch_size >= 1, "--batch-size must be at least 1"),
            (self.train.grad_accum >= 1, "--grad-accum must be at least 1"),
            (unfit(self.train.lr) or self.train.lr > 0, "--lr must be positive"),
            (unfit(self.train.weight_decay) or self.train.weight_decay >= 0,
             "--weight-decay must be 0 or more (0.01 to 0.1 is usual)"),
            (self.train.max_steps >= 0, "--max-steps must be 0 or more"),
            (unfit(self.train.epochs) or self.train.epochs > 0, "--epochs must be positive"),
            (self.train.warmup_steps >= 0, "--warmup-steps must be 0 or more"),
            (unfit(self.train.max_grad_norm) or self.train.max_grad_norm >= 0, "--max-grad-norm must be 0 or more"),
            (unfit(self.train.lora_plus_ratio) or self.train.lora_plus_ratio > 0, "--lora-plus-ratio must be positive"),
            (min(self.train.save_steps, self.train.eval_steps, self.train.save_total_limit) >= 0,
             "--save-steps, --eval-steps and --save-total-limit must be 0 or more"),
            (self.train.logging_steps >= 1, "--logging-steps must be at least 1"),
            (self.train.num_processes >= 1, "--num-processes must be at least 1"),
            (unfit(self.train.beta) or self.train.beta > 0, "--beta must be positive (0.1 is usual)"),
            (unfit(self.train.label_smoothing) or 0.0 <= self.train.label_smoothing < 0.5,
             "--label-smoothing must be in [0, 0.5)"),
            (self.train.label_smoothing == 0 or self.train.dpo_loss == "sigmoid",
             "--label-smoothing applies to --dpo-loss sigmoid only"),
            (unfit(self.train.orpo_lambda) or self.train.orpo_lambda >= 0, "--orpo-lambda must be 0 or more"),
            (not (self.train.method != "sft" and self.data.packing),
             f"--packing packs SFT examples; --method {self.train.method} trains on whole pairs: drop --packing"),
            (self.train.method == "sft" or not self.data.train_on_inputs,
             f"--train-on-inputs is for SFT; --method {self.train.method} scores the responses only"),
            (self.train.method != "sft" or self.data.format != "preference",
             "--format preference holds pairs for preference tuning: add --method dpo or --method orpo"),
            (self.train.method == "sft" or self.data.format in ("auto", "preference"),
             f"--method {self.train.method} trains on preference pairs: use --format preference (or auto)"),
            (not (self.train.fsdp and self.model.bits == 8),
             "--fsdp shards 4-bit or 16-bit bases; 8-bit (LLM.int8) weights cannot be sharded: use --bits 4"),
        ]
        problems += [message for ok, message in checks if not ok]
        problems += parse_field_map(self.data.field_map)[1]
        problems += [f"--report-to {name!r} is not one of none, {', '.join(TRACKERS)}"
                     for name in report_targets(self.train.report_to) if name not in TRACKERS]
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self


def option_name(field_name: str) -> str:
    """The CLI spelling of a config field: ``max_seq_len`` -> ``--max-seq-len``."""
    return "--" + field_name.replace("_", "-")


def field_type(f: dataclasses.Field) -> type:
    """The plain Python type of a field, with ``X | None`` unwrapped to ``X``."""
    tp = f.type if not isinstance(f.type, str) else eval(f.type, {"str": str, "int": int, "float": float, "bool": bool})  # noqa: S307
    if get_origin(tp) is not None:
        tp = next(a for a in get_args(tp) if a is not type(None))
    return tp


def load_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a Config from an optional YAML file, then apply overrides (flag values that were given).

    Args:
        yaml_path: a YAML file with sections ``model``, ``lora``, ``data``, ``train`` (or a flat mapping
            of field names, which is also accepted). A relative model, adapter, data or eval_data
            path in it that exists beside the file is read from there (``_beside_file``); output
            and flag values are relative to the current folder.
        overrides: ``{field_name: value}``; ``None`` values mean "not given" and are ignored.

    Raises:
        ConfigError: unknown keys, or a YAML file that cannot be parsed (with file and line).
    """
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values = _beside_file(_read_yaml(Path(yaml_path)), Path(yaml_path).parent)
    from_file = set(values)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    from_file -= {k for k, v in (overrides or {}).items() if v is not None}
    config = Config()
    known = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}" + (f" in {yaml_path}" if yaml_path else ""))
    for name, value in values.items():
        section = getattr(config, known[name])
        f = next(f for f in dataclasses.fields(section) if f.name == name)
        try:
            setattr(section, name, _coerce(value, field_type(f), name))
        except ConfigError as e:
            if name not in from_file:
                raise
            raise ConfigError(f"{_yaml_line(Path(yaml_path), name)}: {e}") from None
    return config


def _yaml_line(path: Path, key: str) -> str:
    """``FILE:LINE`` of the first ``key:`` in a YAML file (``FILE`` alone when not found)."""
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*:")
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if pattern.match(line):
            return f"{path}:{number}"
    return str(path)


# Settings naming something that must already exist: in a YAML file a relative one is looked up
# beside the file first, so a config works from any folder (flags stay relative to the current one).
INPUT_PATHS = ("model", "adapter", "data", "eval_data")


def _beside_file(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``values`` with each relative input path that exists under ``folder`` rewritten to it.

    A value found only relative to the current folder, a hub id or ``demo`` is left as it is, so
    configs written for the current folder (and the run's own saved config.yaml) keep working.
    """
    out = dict(values)
    for name in INPUT_PATHS:
        value = out.get(name)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            candidate = folder / value
            if candidate.exists():
                out[name] = os.path.normpath(candidate)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _coerce(value: Any, tp: type, name: str) -> Any:
    """Convert YAML/CLI values to the field's type (YAML may give 2e-4 as a string, lists for targets)."""
    if value is None:
        return None
    if tp is str and isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if tp is str and isinstance(value, dict):  # field_map: {output: answer} in YAML
        return ",".join(f"{k}={v}" for k, v in value.items())
    try:
        if tp is bool and isinstance(value, str):
            lowered = value.lower()
            if lowered not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(value)
            return lowered in ("true", "yes", "1")
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if tp in (int, float) and isinstance(value, bool):  # YAML `rank: true` is not rank 1
            raise ValueError(value)
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option_name(name)}: expected {tp.__name__}, got {value!r}") from None


def reference_markdown() -> str:
    """The configuration reference for the README, generated from the dataclasses above."""
    lines = []
    for section_name, cls in SECTIONS.items():
        lines += [f"**{section_name}** — {cls.__doc__.strip()}", "", "| option | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            meaning = f.metadata["help"] + (f" One of: {', '.join(map(str, choices))}." if choices else "")
            lines.append(f"| `{option_name(f.name)}` | `{default}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


