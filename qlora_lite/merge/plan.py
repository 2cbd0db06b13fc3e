"""The merge plan: what each tensor of the merged model is, computed one tensor at a time.

A merged tensor is ``W + scale * B @ A`` on the merge base (the dequantized quantized base the adapter
was trained against, or the original 16-bit weight); every other tensor is copied unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from qlora_lite.errors import MergeError
from qlora_lite.kernels.lora_4bit import dequantize_4bit_computed
from qlora_lite.model.adapter import check_compatible, layer_alpha, read_adapter
from qlora_lite.model.bnb import dequantize_weight, quantize_linear, quantized_layer_names
from qlora_lite.model.folder import read_model_config, resolve_model_dir, weight_files
from qlora_lite.model.loading import checkpoint_key_map, meta_model, release_freed_memory
from qlora_lite.model.lora import lora_scaling, merge_weight
from qlora_lite.storage.safetensors_io import (
    TensorEntry,
    iter_tensors,
    read_headers,
)

MERGE_BASES = ("dequantized", "original")


@dataclass
class MergePlan:
    """Everything needed to produce the merged tensors, decided before any tensor is read."""

    base_dir: Path
    entries: list[TensorEntry]
    config: dict
    # checkpoint key -> (A, B, scaling, DoRA magnitudes or None)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]]
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
    model = meta_model(read_model_config(base_dir, trust_remote_code), trust_remote_code=trust_remote_code)
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
            if "lora_magnitude_vector" in parts and isinstance(model.get_submodule(module), Conv1D):
                raise MergeError(f"{adapter_dir}: {module} is a Conv1D layer (GPT-2 style) with DoRA magnitudes; "
                                 "merging DoRA into such layers is not supported yet (run base + adapter instead)")
            rank = parts["lora_A"].shape[0]
            scaling = lora_scaling(rank, layer_alpha(config, module, rank), bool(config.get("use_rslora")))
            lora[owners[module]] = (parts["lora_A"], parts["lora_B"], scaling, parts.get("lora_magnitude_vector"))
        if merge_base == "dequantized":
            quant = _quant_settings(record, bits, quant_type, double_quant, notes)
    layers = [n for n in quantized_layer_names(model) if n in owners]
    quantized = {owners[n] for n in layers} if quant["bits"] in (4, 8) else set()
    conv1d = {owners[n] for n in owners if isinstance(model.get_submodule(n), Conv1D)}
    return MergePlan(base_dir, entries, json.loads((base_dir / "config.json").read_text()), lora, quantized,
                     conv1d, merge_base, quant, Path(adapter_dir) if adapter_dir else None, notes)


def as_trained_weight(weight: torch.Tensor, conv1d: bool, quant: dict, as_computed: bool = False) -> torch.Tensor:
    """dequantize(quantize(W)), exactly as ``model.loading.load_base_model`` quantizes it for training.

    Returns fp32, or with ``as_computed`` (4-bit only) the compute-dtype weight a 4-bit layer
    multiplies by, without an fp32 copy (the merge check's reference side).
    """
    layer = quantize_linear(weight.t() if conv1d else weight, None, bits=quant["bits"],
                            quant_type=quant["quant_type"], double_quant=quant["double_quant"],
                            compute_dtype=quant["compute_dtype"])
    deq = dequantize_4bit_computed(layer.weight) if as_computed else dequantize_weight(layer)  # (out, in)
    # Params4bit and its layer reference each other: unless the cycle is cut, every quantized copy
    # lives until the next automatic gc (a full gc.collect() per tensor is slow), and the heap fragments.
    if hasattr(layer.weight, "module"):
        layer.weight.module = None
        layer.weight.quant_state = None
    del layer
    release_freed_memory()
    return deq.t() if conv1d else deq


def merge_base_weight(plan: MergePlan, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """One base tensor as the training model held it: what the adapter was added to.

    A 4-bit weight is quantized and dequantized to the compute dtype as the training forward does it,
    an 8-bit one is its int8 codes times their scales (fp32). Under the dequantized policy every other
    float tensor is rounded to the compute dtype when that loses bits (an fp32 checkpoint trained in
    bf16); a wider compute dtype holds it exactly, so it stays as stored (no fp32 copy of a bf16
    embedding on CPUs that compute in fp32). Under ``original`` it is the checkpoint's.
    """
    if key in plan.quantized:
        return as_trained_weight(tensor, key in plan.conv1d, plan.quant, as_computed=plan.quant["bits"] == 4)
    compute = plan.quant.get("compute_dtype")
    # torch promotes a float dtype only to one that holds all its values: bf16 and fp16 -> fp32, not bf16 <-> fp16
    if compute is not None and tensor.is_floating_point() and torch.promote_types(tensor.dtype, compute) != compute:
        return tensor.to(compute)
    return tensor


def merged_tensor(plan: MergePlan, key: str, base: torch.Tensor) -> torch.Tensor:
    """The merged value of one tensor from its merge base (``merge_base_weight``): fp32 where an adapter
    is merged in, else the base itself."""
    if key not in plan.lora:
        return base
    lora_A, lora_B, scaling, magnitude = plan.lora[key]
    return merge_weight(base, lora_A, lora_B, scaling, fan_in_fan_out=key in plan.conv1d, magnitude=magnitude)


def iter_merged_tensors(plan: MergePlan, progress: bool = False, with_base: bool = False):
    """Yield ``(checkpoint_key, merged_tensor)`` in checkpoint order, one tensor in memory at a time;
    with ``with_base``, ``(checkpoint_key, merge_base, merged_tensor)`` (the merge check's inputs)."""
    bar = tqdm(total=len(plan.entries), unit="tensor", desc="merge", disable=not progress)
    for entry, tensor in iter_tensors(plan.entries):
        base = merge_base_weight(plan, entry.name, tensor)
        merged = merged_tensor(plan, entry.name, base)
        yield (entry.name, base, merged) if with_base else (entry.name, merged)
        bar.update(1)
    bar.close()
