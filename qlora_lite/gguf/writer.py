"""Write a GGUF file (llama.cpp / Ollama) from a model folder, optionally merging an adapter on the way.

Tensors are streamed: the GGUF header and tensor table are planned from the safetensors headers,
then each tensor is read, merged (``merge.plan.iter_merged_tensors``, the same code as ``merge``),
converted and appended, so memory stays at about one tensor. Only the ``gguf`` Python package is
used; no llama.cpp build. The layout follows llama.cpp's convert_hf_to_gguf.py: Llama-family q/k
projections are permuted to llama.cpp's rotary layout, 1-D tensors (norms, biases) stay F32.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from qlora_lite.errors import GGUFExportError, GGUFVerifyError, MergeVerificationError
from qlora_lite.gguf.ollama import write_modelfile
from qlora_lite.gguf.verify import ExpectedGGUF, format_problems, verify_gguf
from qlora_lite.gguf.vocab import add_tokenizer
from qlora_lite.merge.plan import MergePlan, iter_merged_tensors, plan_merge
from qlora_lite.merge.write import merge_adapter
from qlora_lite.model.folder import resolve_model_dir
from qlora_lite.storage.output_dir import check_writable, write_failure

log = logging.getLogger(__name__)


# Hugging Face model_type -> GGUF architecture (Mistral is the Llama graph in llama.cpp).
SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
OUT_TYPES = ("f16", "bf16", "q8_0")
# The dtype an adapter is merged in before the export: the file's own (f16, bf16: exact), fp32 for q8_0.
MERGE_DTYPE = {"f16": "fp16", "bf16": "bf16", "q8_0": "fp32"}
_SKIP = re.compile(r"rotary_emb\.inv_freq$|\.attn\.(masked_)?bias$")


def _gguf():
    return gguf


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _add_hparams(writer, config: dict, arch: str, out_type: str, name: str) -> None:
    """Architecture hyper-parameters under the keys llama.cpp reads (``{arch}.context_length`` ...)."""
    gguf = _gguf()
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    scaling = _rope_scaling(config)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif rope_type not in (None, "default", "llama3"):  # llama3: the rope_freqs tensor, see below
        log.warning("rope scaling %r is not written to the GGUF file; long-context behaviour may differ", rope_type)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_scaling(config: dict) -> dict:
    """RoPE scaling settings: ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5)."""
    return config.get("rope_scaling") or config.get("rope_parameters") or {}


def llama3_rope_factors(config: dict) -> torch.Tensor | None:
    """Llama 3.1+ frequency divisors (head_dim/2,), stored as ``rope_freqs.weight`` as llama.cpp does.

    llama.cpp divides each rotary frequency by its factor; None when the model has no llama3 scaling.
    """
    scaling = _rope_scaling(config)
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (_rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", config.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)  # between the two bands: interpolate
    factors = torch.where(wavelen < old_context / high, torch.ones_like(freqs), factors)  # high frequencies kept
    return torch.where(wavelen > old_context / low, torch.full_like(freqs, factor), factors).float()


def permute_qk(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """Reorder the rows of a q/k projection from HF's rotate-half layout to llama.cpp's interleaved one.

    Args:
        weight: (n_head * head_dim, in) or a bias (n_head * head_dim,).
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _layout(plan: MergePlan, arch: str, out_type: str) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """``(checkpoint_key, gguf_name, ggml_type, shape)`` per written tensor, in checkpoint order."""
    gguf = _gguf()
    config = plan.config
    arches = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
    tmap = gguf.get_tensor_name_map(arches[arch], config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    layout = []
    for entry in plan.entries:
        if _SKIP.search(entry.name) or (tied and entry.name == "lm_head.weight"):
            continue
        name = tmap.get_name(entry.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"{plan.base_dir}: tensor {entry.name} has no GGUF name for the {arch} "
                                  "architecture; this model variant is not supported")
        kind = "f32" if len(entry.shape) == 1 else out_type
        if kind == "q8_0" and entry.shape[-1] % 32:
            kind = "f16"  # Q8_0 blocks hold 32 values along a row; llama.cpp falls back the same way
        layout.append((entry.name, name, kind, tuple(entry.shape)))
    return layout


def _ggml_type(kind: str):
    gguf = _gguf()
    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]


def _add_tensor_info(writer, name: str, kind: str, shape: tuple[int, ...]) -> None:
    gguf = _gguf()
    if kind in ("f32", "f16"):
        np_dtype = np.float32 if kind == "f32" else np.float16
        writer.add_tensor_info(name, shape, np.dtype(np_dtype), int(np.prod(shape)) * np.dtype(np_dtype).itemsize)
        return
    byte_shape = gguf.quant_shape_to_byte_shape(shape, _ggml_type(kind))
    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=_ggml_type(kind))


def _convert(tensor: torch.Tensor, kind: str) -> np.ndarray:
    array = tensor.float().numpy()
    if kind == "f32":
        return array
    if kind == "f16":
        return array.astype(np.float16)
    return _gguf().quants.quantize(array, _ggml_type(kind))


def _maybe_permute(key: str, tensor: torch.Tensor, arch: str, config: dict) -> torch.Tensor:
    if arch != "llama":
        return tensor
    heads = config["num_attention_heads"]
    if key.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_qk(tensor, heads, heads)
    if key.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_qk(tensor, heads, config.get("num_key_value_heads") or heads)
    return tensor


def export_gguf(
    model_dir: str | Path,
    output_file: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    out_type: str = "f16",
    modelfile: bool = False,
    merge_base: str = "dequantized",
    bits: int | None = None,
    quant_type: str | None = None,
    double_quant: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    echo=None,
) -> Path:
    """Write ``output_file`` (GGUF) from a Hugging Face model folder, merging ``adapter_dir`` if given.

    The file is written under a temporary name beside ``output_file``, read back and checked
    (``gguf.verify.verify_gguf``: tensors, their bytes, metadata) and only then renamed into place,
    so ``output_file`` is never half written and an existing file there survives a failed export.
    With ``adapter_dir`` the adapter is first merged by ``merge.write.merge_adapter`` into a temporary
    folder beside ``output_file``, with its check against base+adapter, in the dtype the GGUF file
    holds (so no value is rounded twice); the folder is removed afterwards.

    Args:
        out_type: f16, bf16 or q8_0 for the 2-D weights (norms and biases stay F32).
        modelfile: also write an Ollama ``Modelfile`` beside the GGUF file.
        merge_base, bits, quant_type, double_quant: as for ``merge.write.merge_adapter``.
        overwrite: replace an existing GGUF file at ``output_file`` (and a Modelfile beside it). Without
            it an existing file is refused; a file of the model or adapter folder itself is refused either way.
        echo: called with the one-line summary of the read-back check (e.g. ``click.echo``), then,
            for q8_0, with a line naming the matrices kept in F16 (``q8_0_fallbacks``) if any.

    Returns:
        The GGUF path.

    Raises:
        errors.MergeVerificationError: the merge with ``adapter_dir`` failed its check (nothing written).
        GGUFExportError: unsupported architecture, tokenizer or tensor; bad output type; an
            output that exists (without ``overwrite``) or belongs to the model or adapter folder; a
            Modelfile already beside the output without ``overwrite``.
        errors.GGUFVerifyError: the file read back differs from what was written; it is kept
            as ``<output_file>.failed`` and the message lists each difference.
    """
    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"--type must be one of {', '.join(OUT_TYPES)}, got {out_type!r}")
    output = Path(output_file)
    if modelfile and output.with_name("Modelfile").exists() and not overwrite:
        raise GGUFExportError(f"{output.with_name('Modelfile')} already exists (an earlier export's?); pass --overwrite "
                              "to replace it, or write the GGUF file into another folder (nothing was written)")
    model_dir = resolve_model_dir(model_dir)
    output = Path(output_file)
    check_output(output, [model_dir] + ([Path(adapter_dir)] if adapter_dir else []), overwrite)
    check_writable(output.parent)
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise GGUFExportError(f"{model_dir}: model type {model_type!r} cannot be exported to GGUF yet; supported: "
                              f"{', '.join(sorted(SUPPORTED))} (for others use llama.cpp's convert_hf_to_gguf.py "
                              "on the merged folder from `qlora-lite merge`)")
    tok_dir = Path(adapter_dir) if adapter_dir and (Path(adapter_dir) / "tokenizer.json").exists() else model_dir
    if adapter_dir is not None:  # the verified merge first, then the export of what it wrote
        output.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.merge-"))
        try:
            merged = work / "merged"
            merge_adapter(model_dir, adapter_dir, merged, merge_base=merge_base, dtype=MERGE_DTYPE[out_type],
                          progress=progress, bits=bits, quant_type=quant_type, double_quant=double_quant)
            return _export(merged, output, config, model_type, out_type, tok_dir, modelfile, progress, echo)
        except MergeVerificationError:
            raise  # its message names the .failed folder kept in ``work`` for inspection
        finally:
            if not (work / "merged.failed").exists():
                shutil.rmtree(work, ignore_errors=True)
    return _export(model_dir, output, config, model_type, out_type, tok_dir, modelfile, progress, echo)


def _export(model_dir: Path, output: Path, config: dict, model_type: str, out_type: str, tok_dir: Path,
            modelfile: bool, progress: bool, echo) -> Path:
    """``export_gguf`` of a folder with nothing left to merge (checks done)."""
    plan = plan_merge(model_dir)
    for note in plan.notes:
        log.warning(note)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    try:
        expected = _write(tmp, plan, config, SUPPORTED[model_type], out_type, tok_dir, progress)
        summary = verify_gguf(tmp, expected)
    except GGUFVerifyError as e:
        failed = output.with_name(output.name + ".failed")
        os.replace(tmp, failed)
        kept = "was left as it was" if output.exists() else "was not created"
        raise GGUFVerifyError(f"{output}: the written GGUF file failed its read-back check:"
                              f"{format_problems(e.problems)}\nIt was kept as {failed} for inspection; {output} "
                              f"{kept}. Unless a line above says what to change in the model, the cause is a disk "
                              "problem (full, failing) or a bug in the export: please report these lines.",
                              e.problems) from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "was left as it was" if output.exists() else "was not created"
        raise GGUFExportError(f"writing {output} failed: {write_failure(e)}; the partial file was removed and "
                              f"{output} {kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, output)
    log.info("%s: %s", output, summary)
    fallbacks = q8_0_fallbacks(expected.tensors) if out_type == "q8_0" else ""
    if echo is not None:
        echo(summary)
        if fallbacks:
            echo(fallbacks)
    if modelfile:
        write_modelfile(output, tok_dir, model_dir)
    return output


def q8_0_fallbacks(tensors: dict[str, tuple[str, tuple[int, ...]]], shown: int = 5) -> str:
    """A line naming the matrices a q8_0 export kept in F16, or "" when every one is Q8_0.

    Args:
        tensors: GGUF name -> (kind, shape), as planned (``gguf.verify.ExpectedGGUF.tensors``).
    """
    matrices = {name: shape for name, (kind, shape) in tensors.items() if len(shape) > 1}
    kept = [f"{name} ({shape[-1]} per row)" for name, shape in matrices.items() if tensors[name][0] == "f16"]
    if not kept:
        return ""
    more = f" and {len(kept) - shown} more" if len(kept) > shown else ""
    return (f"note: q8_0 kept {len(kept)} of {len(matrices)} weight matrices in F16, their rows not a multiple of "
            f"Q8_0's 32-value blocks (llama.cpp does the same): {', '.join(kept[:shown])}{more}")


def check_output(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an ``output`` that would replace something the user has.

    A file inside one of the ``inputs`` folders (the model, the adapter) is refused unless it is
    itself a GGUF file and ``overwrite`` is set: the folder's weights, config or tokenizer are never
    replaced. Anything else that exists is replaced only with ``overwrite``, and only if it is a file.

    Raises:
        GGUFExportError: saying which path and what to do instead.
    """
    if output.is_dir():
        raise GGUFExportError(f"--output {output} is a folder; give a file name, e.g. {output / 'model.gguf'}")
    target = output.resolve()
    for folder in inputs:
        if folder.resolve() in target.parents and target.exists() and not (overwrite and _is_gguf(target)):
            raise GGUFExportError(f"--output {output} is a file of the input folder {folder}; it is never replaced. "
                                  "Write the GGUF file under a new name or outside that folder.")
    if output.exists() and not overwrite:
        raise GGUFExportError(f"--output {output} exists; pass --overwrite to replace it, or choose another name")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _write(path: Path, plan: MergePlan, config: dict, arch: str, out_type: str, tok_dir: Path, progress: bool):
    """Write the GGUF file ``path`` (header, metadata, streamed tensors) and fsync it.

    Returns:
        ``gguf.verify.ExpectedGGUF``: the planned tensors, the metadata handed to the writer and the
        CRC-32 of every tensor's bytes, for the read-back check.
    """
    layout = _layout(plan, arch, out_type)
    rope_factors = llama3_rope_factors(config) if arch == "llama" else None
    planned = [("rope_freqs.weight", "f32", tuple(rope_factors.shape))] if rope_factors is not None else []
    planned += [(name, kind, shape) for _, name, kind, shape in layout]
    expected = ExpectedGGUF(arch, {name: (kind, shape) for name, kind, shape in planned})
    writer = _gguf().GGUFWriter(path, arch)
    try:
        _add_hparams(writer, config, arch, out_type, plan.base_dir.name)
        expected.specials = add_tokenizer(writer, tok_dir, config["vocab_size"])
        for name, kind, shape in planned:
            _add_tensor_info(writer, name, kind, shape)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        expected.metadata = dict(writer.kv_data[0])
        if rope_factors is not None:
            writer.write_tensor_data(expected.record("rope_freqs.weight", rope_factors.numpy()))
        names = {key: (name, kind) for key, name, kind, _ in layout}
        for key, tensor in iter_merged_tensors(plan, progress):
            if key in names:
                name, kind = names[key]
                writer.write_tensor_data(expected.record(name, _convert(_maybe_permute(key, tensor, arch, config),
                                                                        kind)))
    finally:
        writer.close()
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # the check must read what is on disk, and the rename must not outrun the data
    return expected
