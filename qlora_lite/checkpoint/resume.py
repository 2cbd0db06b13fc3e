"""Whether a run may start or resume in an output folder: run fingerprints, resume compatibility, and
the guard that keeps a run from writing over the user's files.

Resume compatibility (``check_resume_compatible``): settings that change which examples form which
step, or the shape/meaning of the trained weights, are refused (dataset, its split, config and field
map, batch size, grad accum, seed, model, bits/quantization, LoRA rank/alpha/targets/dtype,
max_seq_len, packing, data format, process count, optimizer); settings that only change the future of the run warn (lr, schedule,
max_steps/epochs, save/eval/logging steps, dropout, clipping, weight decay).

The training entry point checks all of this from ``checkpoint.folder.read_trainer_state`` (JSON only) before
the model is loaded, so a refused resume costs no model load.
"""

from __future__ import annotations

from pathlib import Path

from qlora_lite.checkpoint.folder import CHECKPOINT_FOLDER, is_own_checkpoint
from qlora_lite.checkpoint.run_folder import LOCK_NAME, RUN_MARKER, not_ours, read_marker
from qlora_lite.checkpoint.state import TRAINER_STATE
from qlora_lite.errors import CheckpointError
from qlora_lite.model.adapter import CONFIG_NAME, RECORD_NAME, WEIGHTS_NAME
from qlora_lite.storage.output_dir import PROBE_PREFIX

# fingerprint key -> (what the user reads, refused?). Refused: the saved state cannot continue the
# same run (other data order, other step contents, other weight shapes/meaning). Others only warn.
FINGERPRINT_KEYS: dict[str, tuple[str, bool]] = {
    "dataset_sha256": ("dataset", True), "eval_fraction": ("eval fraction (changes the training split)", True),
    "data_split": ("data split", True), "data_config": ("data config", True), "field_map": ("field map", True),
    "format": ("data format", True), "max_seq_len": ("max seq len", True), "packing": ("packing", True),
    "drop_long": ("drop long", True), "train_on_inputs": ("train on inputs", True),
    "batch_size": ("batch size", True), "grad_accum": ("grad accum", True), "seed": ("seed", True),
    "num_processes": ("number of processes", True), "model": ("base model", True), "bits": ("bits", True),
    "quant_type": ("quant type", True), "double_quant": ("double quant", True),
    "compute_dtype": ("compute dtype", False), "rank": ("LoRA rank", True), "alpha": ("LoRA alpha", True),
    "rslora": ("rsLoRA", True), "dora": ("DoRA", True), "target_modules": ("target modules", True), "lora_dtype": ("LoRA dtype", True),
    "adapter": ("starting adapter", True), "optimizer": ("optimizer", True),
    "lr": ("learning rate", False), "lr_scheduler": ("lr scheduler", False), "warmup_steps": ("warmup steps", False),
    "weight_decay": ("weight decay", False), "lora_plus_ratio": ("LoRA+ ratio", True), "max_grad_norm": ("max grad norm", False),
    "max_steps": ("max steps", False), "epochs": ("epochs", False), "save_steps": ("save steps", False),
    "eval_steps": ("eval steps", False), "save_total_limit": ("save total limit", False),
    "logging_steps": ("logging steps", False), "dropout": ("LoRA dropout", False),
    "gradient_checkpointing": ("gradient checkpointing", False), "eval_data": ("eval data", False),
    "eval_split": ("eval split", False),
    "examples_per_epoch": ("examples per epoch", True),
    "method": ("training method", True), "dpo_loss": ("DPO loss", True), "beta": ("beta", False),
    "label_smoothing": ("label smoothing", False), "orpo_lambda": ("ORPO lambda", False),
}


# Spreading the same global batch (batch size x processes x grad accum) differently trains each step
# on the same examples with the same loss (train.batches.epoch_batches), so all three may change together.
_LAYOUT_KEYS = ("batch_size", "num_processes", "grad_accum")


def global_batch(fingerprint: dict) -> int:
    """Sequences per optimizer step over all processes."""
    return fingerprint["batch_size"] * fingerprint.get("num_processes", 1) * fingerprint.get("grad_accum", 1)


def _relaid_keys(saved: dict, current: dict) -> set[str]:
    """The process-layout keys whose change is allowed: the global batch and the epoch stay the same."""
    if "batch_size" not in saved or "batch_size" not in current:
        return set()
    same = (global_batch(saved) == global_batch(current)
            and saved.get("examples_per_epoch") == current.get("examples_per_epoch"))
    return set(_LAYOUT_KEYS) if same else set()


def make_fingerprint(settings: dict, dataset_sha256: str, **extra) -> dict:
    """The fingerprint of a run: every known key found in ``settings`` (a flat dict, or a nested
    ``Config.to_dict()``), the dataset hash, and ``extra`` entries."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    fingerprint = {k: flat[k] for k in FINGERPRINT_KEYS if k in flat}
    return {**fingerprint, "dataset_sha256": dataset_sha256, **extra}


def _show(key: str, value) -> str:
    return str(value)[:12] if key.endswith("sha256") and value else repr(value) if isinstance(value, str) else str(value)


def check_resume_compatible(saved_state: dict, fingerprint: dict) -> list[str]:
    """Compare the fingerprint saved in a checkpoint with the current run's.

    Args:
        saved_state: the checkpoint's trainer_state (its ``"fingerprint"`` entry is used) or a fingerprint.
        fingerprint: the current run's (see ``make_fingerprint``).

    Returns:
        Warnings for allowed changes ("learning rate changed 0.0002 -> 0.0001 ...").

    Raises:
        CheckpointError: naming every refused change, and what to do.
    """
    saved = saved_state.get("fingerprint", saved_state)
    refused, warned = [], []
    relaid = _relaid_keys(saved, fingerprint)
    for key in sorted(set(saved) & set(fingerprint), key=lambda k: list(FINGERPRINT_KEYS).index(k)
                      if k in FINGERPRINT_KEYS else len(FINGERPRINT_KEYS)):
        old, new = saved[key], fingerprint[key]
        if old == new:
            continue
        label, refuse = FINGERPRINT_KEYS.get(key, (key.replace("_", " "), False))
        refuse = refuse and key not in relaid
        if key.endswith("sha256"):
            (refused if refuse else warned).append(f"{label} changed (sha256 {_show(key, old)} -> {_show(key, new)})")
        else:
            (refused if refuse else warned).append(f"{label} changed {_show(key, old)} -> {_show(key, new)}")
    if refused:
        layout = saved.get("num_processes", 1) != fingerprint.get("num_processes", 1)
        raise CheckpointError("cannot resume: " + ", ".join(refused) +
                              "; start a new --output or restore the original settings" +
                              (" (another number of processes may resume when --batch-size x processes x "
                               "--grad-accum stays the same)" if layout else ""))
    return [w + " (allowed on resume)" for w in warned]


# The folder of --report-to logs (TensorBoard events, W&B and MLflow files) inside --output.
TRACKING_DIR = "tracking"

# Names a qlora-lite run may write at the top of its output folder (guard_output_dir accepts them).
RUN_FILES = {TRACKING_DIR, CONFIG_NAME, WEIGHTS_NAME, RECORD_NAME, "metrics.jsonl", "config.yaml", "loss.png", "README.md",
             "train.log", "eval.json", "eval_results.json", TRAINER_STATE, "run.json", "fingerprint.json",
             RUN_MARKER, LOCK_NAME, "reference_logps.safetensors"}


def _is_run_entry(path: Path) -> bool:
    if CHECKPOINT_FOLDER.match(path.name):
        return path.is_dir() and is_own_checkpoint(path)
    return path.name in RUN_FILES or path.name.endswith(".tmp")


def guard_output_dir(output_dir, model_dir, resume: bool, adapter_dir=None) -> None:
    """Refuse an output folder that would harm the user's files or mix two runs. Never deletes anything.

    A non-empty folder counts as a qlora-lite run only when it holds the run marker
    (``checkpoint.run_folder.RUN_MARKER``); the top-level files a run replaces must still be what it wrote.

    Raises:
        CheckpointError: --output equals or lies inside the model folder; it is or holds the starting
            ``adapter_dir``; the folder holds files qlora-lite did not write (or the user changed), or
            has no run marker; or it holds a previous run and ``resume`` is false.
    """
    out = Path(output_dir).expanduser().resolve()
    if model_dir and Path(model_dir).expanduser().is_dir():
        model = Path(model_dir).expanduser().resolve()
        if out == model or model in out.parents:
            raise CheckpointError(f"--output {output_dir} is inside the model folder {model_dir}; writing there "
                                  "would mix training files into the model; choose a folder outside it")
    if adapter_dir and Path(adapter_dir).expanduser().is_dir():
        adapter = Path(adapter_dir).expanduser().resolve()
        if adapter == out or out in adapter.parents:
            raise CheckpointError(f"--adapter {adapter_dir} lies in --output {output_dir}: the run's final save or "
                                  "checkpoint rotation would replace the adapter it starts from; choose another "
                                  "--output")
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"--output {output_dir} is a file, not a folder; choose a folder path")
    # a lock alone is an empty folder; a write probe is another process of this run checking the folder
    entries = sorted(p for p in out.iterdir() if p.name != LOCK_NAME and not p.name.startswith(PROBE_PREFIX))
    if not entries:
        return
    marked = read_marker(out) is not None
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries if not (marked and _is_run_entry(p))]
    foreign += [name + " (changed since qlora-lite wrote it)" for name in (not_ours(out) if marked else [])]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        unmarked = "" if marked else (f" (no {RUN_MARKER} marker: not a qlora-lite run; a run from a qlora-lite "
                                      f"version before the marker can be resumed after `touch {out / RUN_MARKER}`)")
        raise CheckpointError(f"--output {output_dir} holds files qlora-lite did not write ({shown}){unmarked}; "
                              "choose an empty or new folder, or move those files away (nothing was deleted)")
    if not resume:
        shown = ", ".join(p.name for p in entries if p.name != RUN_MARKER)[:200]
        raise CheckpointError(f"--output {output_dir} already holds a qlora-lite run ({shown}); pass --resume to "
                              "continue it, or choose another --output")
