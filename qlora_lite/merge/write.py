"""Streaming merge: base checkpoint + LoRA adapter -> a plain Hugging Face model folder.

The base is read tensor by tensor with plain file reads (no memory map, so pages of the input never
pile up in the process), each tensor is merged in fp32 with ``model.lora.merge_weight`` and written
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
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, GenerationConfig

from qlora_lite.checkpoint.run_folder import RUN_MARKER
from qlora_lite.data.tokenize import DEFAULT_CHAT_TEMPLATE
from qlora_lite.errors import (
    EstimateError,
    MergeError,
    MergeVerificationError,
)
from qlora_lite.flag_values import parse_size
from qlora_lite.merge.plan import MergePlan, iter_merged_tensors, plan_merge, quant_record
from qlora_lite.merge.verify import StreamCheck, verify_merge
from qlora_lite.model.folder import resolve_model_dir
from qlora_lite.model.loading import DTYPES
from qlora_lite.storage.durable import write_json_atomic
from qlora_lite.storage.output_dir import check_writable, write_failure
from qlora_lite.storage.safetensors_io import (
    plan_shards,
    shard_file_names,
    write_sharded,
)

log = logging.getLogger(__name__)


# Files of a model folder that are weights (rewritten by the merge) rather than metadata to copy.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


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


def _write_merged(plan: MergePlan, folder: Path, dtype: str, max_bytes: int, progress: bool,
                  check: StreamCheck | None) -> list[str]:
    """Stream merged tensors into shards of ``dtype`` (non-float tensors keep theirs), each one
    through ``check`` on its way to the file."""
    out = DTYPES[dtype]
    specs = [(e.name, out if e.dtype.is_floating_point else e.dtype, e.shape) for e in plan.entries]
    shards = plan_shards(specs, max_bytes)
    if check is not None:  # its messages name the file a tensor goes to
        check.files = {name: file for shard, file in zip(shards, shard_file_names(len(shards))) for name, *_ in shard}

    def stream():
        for key, base, merged in iter_merged_tensors(plan, progress, with_base=True):
            stored = merged.to(out) if merged.is_floating_point() else merged
            if check is not None:
                check.tensor(key, base, stored)
            del base, merged
            yield key, stored

    return write_sharded(folder, shards, stream())


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
            ``merge.verify.PROBE_TOLERANCE``).
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
        stream = StreamCheck(plan, dtype) if verify else None
        shards = _write_merged(plan, tmp, dtype, max_bytes, progress, stream)
        _copy_metadata(plan, tmp, dtype)
        check = None
        if verify:
            check = verify_merge(plan, tmp, dtype, stream, tolerance, trust_remote_code)
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

