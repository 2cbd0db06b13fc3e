"""Streaming merge: base checkpoint + LoRA adapter -> a plain Hugging Face model folder.

The base is read tensor by tensor with plain file reads (no memory map, so pages of the input never
pile up in the process), each tensor is merged in fp32 with ``lora.merge_weight`` and written
straight into its output shard, whose header was planned from the input headers alone. Peak memory
is therefore a few tensors, not a shard and never the model. The result is written to a hidden
temporary folder, checked tensor by tensor against an exact reconstruction and on a probe input
(``merge_check``), and only then renamed into place; a merge that fails is left beside the output
as ``<output>.failed``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import AdapterError, check_compatible, read_adapter, write_json_atomic
from .errors import QloraLiteError
from .fastpath import dequantize_4bit_computed
from .lora import lora_scaling, merge_weight
from .memory import EstimateError, parse_size
from .output_dir import check_writable, write_failure
from .quant import (
    DTYPES,
    ModelLoadError,
    _conv1d_class,
    checkpoint_key_map,
    dequantize_weight,
    quantize_linear,
    quantized_layer_names,
    read_model_config,
    release_freed_memory,
    resolve_model_dir,
    weight_files,
)
from .run_folder import RUN_MARKER
from .safetensors_io import TensorEntry, iter_tensors, plan_shards, read_headers, write_sharded

log = logging.getLogger(__name__)

MERGE_BASES = ("dequantized", "original")
# Files of a model folder that are weights (rewritten by the merge) rather than metadata to copy.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


class MergeError(QloraLiteError, RuntimeError):
    """The merge cannot run (bad paths, adapter does not fit the base); nothing was written."""


class MergeVerificationError(MergeError):
    """A merged tensor differs from W + scale * B @ A beyond rounding, or the folder's probe logits deviate."""


@dataclass
class MergeReport:
    """What ``merge_adapter`` did. The check's fields are None when verification was skipped.

    ``max_abs_logit_diff`` and ``tolerance`` are the probe's; ``tensors_checked`` tensors matched their
    exact reconstruction, the closest one (``worst_tensor``) at ``worst_ratio`` of its rounding bound.
    """

    output_dir: Path
    max_abs_logit_diff: float | None
    tolerance: float | None
    shards: int
    seconds: float
    merge_base: str = "dequantized"
    notes: list[str] = field(default_factory=list)
    tensors_checked: int | None = None
    worst_tensor: str | None = None
    worst_ratio: float | None = None


@dataclass
class MergePlan:
    """Everything needed to produce the merged tensors, decided before any tensor is read."""

    base_dir: Path
    entries: list[TensorEntry]
    config: dict
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # checkpoint key -> (A, B, scaling)
    quantized: set[str]  # checkpoint keys of the weights the training base held quantized
    conv1d: set[str]  # checkpoint keys of GPT-2 Conv1D weights, stored (in, out)
    merge_base: str
    quant: dict  # bits, quant_type, double_quant, compute_dtype (torch dtype)
    adapter_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


def _quant_settings(record: dict | None, bits, quant_type, double_quant, notes: list[str]) -> dict:
    """Quantization the adapter was trained against: flags first, then qlora_lite.json, then defaults."""
    record = record or {}
    given = {"bits": bits, "quant_type": quant_type, "double_quant": double_quant}
    defaults = {"bits": 4, "quant_type": "nf4", "double_quant": True}
    settings = {}
    for key, value in given.items():
        settings[key] = value if value is not None else record.get(key)
        if settings[key] is None:
            settings[key] = defaults[key]
    if not record:
        notes.append(
            f"the adapter has no qlora_lite.json (not written by qlora-lite), so the quantization it was "
            f"trained against is unknown; assuming bits={settings['bits']} quant_type={settings['quant_type']} "
            f"double_quant={settings['double_quant']} (set --bits/--quant-type/--double-quant, or use "
            "--merge-base original for an adapter trained on the 16-bit model)"
        )
    dtype = record.get("compute_dtype") or "bfloat16"
    settings["compute_dtype"] = getattr(torch, str(dtype).removeprefix("torch."), torch.bfloat16)
    return settings


def quant_record(quant: dict) -> dict:
    """``MergePlan.quant`` as JSON in the typed form qlora_lite.json uses: ints, booleans, "bfloat16"."""
    dtype = quant.get("compute_dtype")
    return {**quant, "compute_dtype": None if dtype is None else str(dtype).removeprefix("torch.")}


def _meta_model(base_dir: Path, trust_remote_code: bool):
    """The model skeleton on the meta device: names, layer kinds and the output head, for free."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = read_model_config(base_dir, trust_remote_code)
    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _alpha_for(name: str, config: dict, rank: int) -> float:
    pattern = config.get("alpha_pattern") or {}
    hit = next((a for p, a in pattern.items() if name == p or name.endswith("." + p)), None)
    return float(hit if hit is not None else config.get("lora_alpha", rank))


def plan_merge(
    base_path: str | Path,
    adapter_dir: str | Path | None = None,
    *,
    merge_base: str = "dequantized",
    bits: int | None = None,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    trust_remote_code: bool = False,
) -> MergePlan:
    """Decide, from headers and the adapter alone, what happens to every base tensor.

    Raises:
        MergeError: unknown merge base, non-safetensors base, adapter layers the base lacks.
        AdapterError: unreadable adapter, or one trained on a different architecture/vocabulary.
    """
    if merge_base not in MERGE_BASES:
        raise MergeError(f"--merge-base must be one of {', '.join(MERGE_BASES)}, got {merge_base!r}")
    base_dir = resolve_model_dir(base_path)
    files = weight_files(base_dir)
    if any(f.suffix != ".safetensors" for f in files):
        raise MergeError(f"{base_dir}: the streaming merge reads safetensors only; convert the .bin weights first")
    entries = read_headers(files)
    model = _meta_model(base_dir, trust_remote_code)
    notes: list[str] = []
    lora, quant = {}, {"bits": 16, "compute_dtype": None}
    resolve = checkpoint_key_map(model, base_dir)
    owners = {}
    for entry in entries:
        name = resolve(entry.name)
        if name is not None and name.endswith(".weight"):
            owners[name.removesuffix(".weight")] = entry.name
    if adapter_dir is not None:
        config, modules, record = read_adapter(adapter_dir)
        check_compatible(record, model, adapter_dir)
        missing = sorted(set(modules) - set(owners))
        if missing:
            raise MergeError(f"{adapter_dir}: the adapter targets {len(missing)} layer(s) the base in {base_dir} "
                             f"does not have, e.g. {', '.join(missing[:3])}; is it the right base model?")
        for module, parts in modules.items():
            rank = parts["lora_A"].shape[0]
            scaling = lora_scaling(rank, _alpha_for(module, config, rank), bool(config.get("use_rslora")))
            lora[owners[module]] = (parts["lora_A"], parts["lora_B"], scaling)
        if merge_base == "dequantized":
            quant = _quant_settings(record, bits, quant_type, double_quant, notes)
    layers = [n for n in quantized_layer_names(model) if n in owners]
    quantized = {owners[n] for n in layers} if quant["bits"] in (4, 8) else set()
    conv1d = {owners[n] for n in owners if isinstance(model.get_submodule(n), _conv1d_class())}
    return MergePlan(base_dir, entries, json.loads((base_dir / "config.json").read_text()), lora, quantized,
                     conv1d, merge_base, quant, Path(adapter_dir) if adapter_dir else None, notes)


def _roundtrip(weight: torch.Tensor, conv1d: bool, quant: dict, as_computed: bool = False) -> torch.Tensor:
    """dequantize(quantize(W)), exactly as ``quant.load_base_model`` quantizes it for training.

    Returns fp32, or with ``as_computed`` (4-bit only) the compute-dtype weight a 4-bit layer
    multiplies by, without an fp32 copy (the merge check's reference side).
    """
    layer = quantize_linear(weight.t() if conv1d else weight, None, bits=quant["bits"],
                            quant_type=quant["quant_type"], double_quant=quant["double_quant"],
                            compute_dtype=quant["compute_dtype"])
    deq = dequantize_4bit_computed(layer.weight) if as_computed else dequantize_weight(layer)  # (out, in)
    # Params4bit and its layer reference each other: unless the cycle is cut, every quantized copy
    # lives until the next automatic gc (a full gc.collect() costs ~1 s here), and the heap fragments.
    if hasattr(layer.weight, "module"):
        layer.weight.module = None
        layer.weight.quant_state = None
    del layer
    release_freed_memory()
    return deq.t() if conv1d else deq


def merged_tensor(plan: MergePlan, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The merged value of one base tensor: fp32 for merged/quantized weights, else as stored.

    Under the dequantized policy every other float tensor passes through the compute dtype, as the
    training model held it.
    """
    if key in plan.quantized:
        tensor = _roundtrip(tensor, key in plan.conv1d, plan.quant)
    elif plan.quant.get("compute_dtype") is not None and tensor.is_floating_point():
        tensor = tensor.to(plan.quant["compute_dtype"])
    if key in plan.lora:
        lora_A, lora_B, scaling = plan.lora[key]
        tensor = merge_weight(tensor, lora_A, lora_B, scaling, fan_in_fan_out=key in plan.conv1d)
    return tensor


def iter_merged_tensors(plan: MergePlan, progress: bool = False):
    """Yield ``(checkpoint_key, merged_tensor)`` in checkpoint order, one tensor in memory at a time."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(plan.entries), unit="tensor", desc="merge", disable=not progress)
    for entry, tensor in iter_tensors(plan.entries):
        yield entry.name, merged_tensor(plan, entry.name, tensor)
        bar.update(1)
    bar.close()


def _check_output(output: Path, base_dir: Path, adapter_dir: Path, overwrite: bool) -> None:
    out, base, adapter = output.resolve(), base_dir.resolve(), Path(adapter_dir).resolve()
    if out == base or base in out.parents:
        raise MergeError(f"output {output} is the base model folder or inside it; choose a folder elsewhere")
    if out == adapter:
        raise MergeError(f"output {output} is the adapter folder; choose another folder")
    if out in base.parents or out in adapter.parents:  # --overwrite would replace the whole folder
        what = "base model" if out in base.parents else "adapter"
        raise MergeError(f"output {output} contains the {what} folder, which --overwrite would delete with it; "
                         "choose a new folder for the merged model")
    if (out / RUN_MARKER).exists():
        raise MergeError(f"output {output} is a training run folder (it holds {RUN_MARKER}); it is never replaced; "
                         "choose a new folder for the merged model")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeError(f"output {output} already exists and is not empty; choose another folder or pass "
                         "--overwrite")
    check_writable(out.parent)  # the merge is written beside --output, then renamed into place


def _copy_metadata(plan: MergePlan, tmp: Path, dtype: str) -> None:
    """Config (dtype updated), tokenizer with chat template, generation config and other small files."""
    from transformers import AutoConfig, GenerationConfig

    for path in sorted(plan.base_dir.iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in _WEIGHT_INDEXES:
            shutil.copy2(path, tmp / path.name)
    # A tokenizer saved with the adapter (e.g. with a chat template set for training) wins.
    if plan.adapter_dir is not None and (plan.adapter_dir / "tokenizer_config.json").exists():
        for name in _TOKENIZER_FILES:
            if (plan.adapter_dir / name).exists():
                shutil.copy2(plan.adapter_dir / name, tmp / name)
    if not _has_chat_template(tmp):
        # Training rendered chats with the default template; the merged model must carry the same one.
        from .data import DEFAULT_CHAT_TEMPLATE

        (tmp / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
        plan.notes.append("the base tokenizer has no chat template; wrote the default one training used")
    config = dict(plan.config)
    config.pop("quantization_config", None)
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = str(
        DTYPES[dtype]).removeprefix("torch.")
    write_json_atomic(tmp / "config.json", config)
    if not (tmp / "generation_config.json").exists():
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(tmp)).save_pretrained(tmp)


def _has_chat_template(folder: Path) -> bool:
    config = folder / "tokenizer_config.json"
    in_config = config.exists() and bool(json.loads(config.read_text()).get("chat_template"))
    return in_config or (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists()


def _place(tmp: Path, output: Path) -> None:
    """Rename the finished temporary folder into place (replacing an old output only now)."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_merged(plan: MergePlan, folder: Path, dtype: str, max_bytes: int, progress: bool) -> list[str]:
    """Stream merged tensors into shards of ``dtype`` (non-float tensors keep theirs)."""
    out = DTYPES[dtype]
    specs = [(e.name, out if e.dtype.is_floating_point else e.dtype, e.shape) for e in plan.entries]
    stream = ((k, t.to(out) if t.is_floating_point() else t) for k, t in iter_merged_tensors(plan, progress))
    return write_sharded(folder, plan_shards(specs, max_bytes), stream)


def _mark_failed(tmp: Path, output: Path, message: str) -> Path:
    """Keep a failed merge for inspection, clearly named, never at the output path."""
    failed = output.with_name(f"{output.name}.failed")
    if failed.exists():
        shutil.rmtree(failed)
    (tmp / "MERGE_FAILED.txt").write_text(message + "\n")
    os.replace(tmp, failed)
    return failed


def merge_adapter(
    base_path: str | Path,
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    merge_base: str = "dequantized",
    dtype: str = "bf16",
    max_shard_size: str | int = "2GB",
    verify: bool = True,
    progress: bool = True,
    tolerance: float | None = None,
    bits: int | None = None,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> MergeReport:
    """Merge a LoRA adapter into its base, streaming, and write a plain Hugging Face model folder.

    Args:
        merge_base: "dequantized" (the quantized weights the adapter was trained against, the
            default) or "original" (the 16-bit checkpoint as it is).
        dtype: dtype of the written weights: bf16, fp16 or fp32.
        max_shard_size: largest output shard, e.g. "2GB".
        verify: before placing the result, compare every merged tensor with its exact value and run a
            probe forward against base+adapter (``merge_check``).
        tolerance: largest allowed |logit difference| of the probe (default: relative, see
            ``merge_check.PROBE_TOLERANCE``).
        bits, quant_type, double_quant: quantization of the training base, for adapters without
            qlora_lite.json (PEFT's); otherwise read from that file.
        overwrite: replace an existing non-empty output folder (only once the new one is verified).

    Returns:
        MergeReport.

    Raises:
        MergeError: bad paths or options; nothing is written.
        MergeVerificationError: a merged tensor or the probe failed; the files are left at ``<output>.failed``.
        AdapterError, ModelLoadError: unreadable or incompatible adapter/base.
    """
    start = time.time()
    if dtype not in DTYPES:
        raise MergeError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        max_bytes = parse_size(max_shard_size)
    except EstimateError as e:
        raise MergeError(f"--max-shard-size: {e}") from None
    output, base_dir = Path(output_dir), resolve_model_dir(base_path)
    _check_output(output, base_dir, Path(adapter_dir), overwrite)
    plan = plan_merge(base_dir, adapter_dir, merge_base=merge_base, bits=bits, quant_type=quant_type,
                      double_quant=double_quant, trust_remote_code=trust_remote_code)
    for note in plan.notes:
        log.warning(note)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards = _write_merged(plan, tmp, dtype, max_bytes, progress)
        _copy_metadata(plan, tmp, dtype)
        check = None
        if verify:
            from .merge_check import verify_merge

            check = verify_merge(plan, tmp, dtype, tolerance, trust_remote_code)
            if check.problem is not None:
                failed = _mark_failed(tmp, output, f"merge verification FAILED: {check.problem}")
                raise MergeVerificationError(_failure_message(check.problem, failed, output, tolerance is not None))
        diff, tol = (check.logit_diff, check.logit_tolerance) if check else (None, None)
        record = {"base_model": str(base_path), "adapter": str(adapter_dir), "merge_base": merge_base,
                  "dtype": dtype, "quantization": quant_record(plan.quant),
                  "max_abs_logit_diff": diff, "tolerance": tol,
                  "tensors_checked": check.tensors if check else None, "notes": plan.notes}
        write_json_atomic(tmp / "qlora_lite_merge.json", record)
        _place(tmp, output)
    except MergeVerificationError:
        raise
    except OSError as e:  # disk full, say: the user's existing --output (if any) was never touched
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "was left as it was" if output.exists() else "was not created"
        raise MergeError(f"writing the merged model failed: {write_failure(e)}; the partial files were removed "
                         f"and {output} {kept}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeReport(output, diff, tol, len(shards), time.time() - start, merge_base, plan.notes,
                       check.tensors if check else None, check.worst_tensor if check else None,
                       check.worst_ratio if check else None)


def _failure_message(problem: str, failed: Path, output: Path, own_tolerance: bool) -> str:
    """What failed, where the files are, and what to do. The check compares with exact values, so a
    failure means the written files are wrong, never that the adapter is poor."""
    if "probe logits deviate" in problem and own_tolerance:
        step = "the probe's bound is the --tolerance you passed; run again without it"
    else:
        step = ("a correct merge never fails this check, so the written files are wrong: make sure the disk is not "
                "full and nothing else writes to the output folder, run the merge again, and if it fails again, "
                "report it with this message")
    return (f"merge verification FAILED: {problem}. The merged files were left in {failed} (the reason is in "
            f"{failed / 'MERGE_FAILED.txt'}); {output} was not written. Next: {step}. Use --no-verify only to "
            "inspect such an output, never to ship it.")


__all__ = ["MergeError", "MergeReport", "MergeVerificationError", "merge_adapter", "plan_merge",
           "iter_merged_tensors", "merged_tensor", "parse_size", "AdapterError", "ModelLoadError"]
