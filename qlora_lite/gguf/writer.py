"""Write a GGUF file (llama.cpp / Ollama) from a model folder, optionally merging an adapter on the way.

Tensors are streamed: the GGUF header and tensor table are planned from the safetensors headers,
then each tensor is read, merged (``merge.plan.iter_merged_tensors``, the same code as ``merge``),
converted and appended, so memory stays at about one tensor. Only the ``gguf`` Python package is
used; no llama.cpp build. What differs between model families (names, hyper-parameters, tensor
transforms) is in ``gguf.architectures``; 1-D tensors (norms, biases) stay F32.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from qlora_lite.errors import GGUFExportError, GGUFVerifyError, MergeVerificationError
from qlora_lite.gguf.architectures import ARCHITECTURES, Architecture
from qlora_lite.gguf.mix import EXPORT_TYPES, FROM_F16, file_type, tensor_type
from qlora_lite.gguf.ollama import write_modelfile
from qlora_lite.gguf.quantize import BLOCKS, quantize
from qlora_lite.gguf.verify import ExpectedGGUF, format_problems, verify_gguf
from qlora_lite.gguf.vocab import add_tokenizer
from qlora_lite.merge.plan import MergePlan, iter_merged_tensors, plan_merge
from qlora_lite.merge.write import merge_adapter
from qlora_lite.model.folder import resolve_model_dir
from qlora_lite.storage.output_dir import check_writable, write_failure

log = logging.getLogger(__name__)


OUT_TYPES = tuple(EXPORT_TYPES)
# The dtype an adapter is merged in before the export: the file's own (f16, bf16: exact), fp32 for q8_0
# (convert_hf_to_gguf.py quantizes from float32), fp16 for the types llama-quantize makes from an f16 file:
# their bytes are then those of llama-quantize run on our f16 export.
MERGE_DTYPE = {"f16": "fp16", "bf16": "bf16", "q8_0": "fp32", "q4_0": "fp16", "q5_0": "fp16", "q4_k_m": "fp16",
               "q5_k_m": "fp16", "q6_k": "fp16"}


def _gguf():
    return gguf


def _add_hparams(writer, config: dict, arch: Architecture, out_type: str, name: str) -> None:
    """Architecture hyper-parameters under the keys llama.cpp reads (``{arch}.context_length`` ...)."""
    gguf = _gguf()
    writer.add_name(name)
    arch.hparams(writer, config)
    writer.add_file_type(file_type(out_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _layout(plan: MergePlan, arch: Architecture, out_type: str) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """``(checkpoint_key, gguf_name, ggml_type, shape)`` per written tensor, in checkpoint order."""
    config = arch.text_config(plan.config)
    tmap = _gguf().get_tensor_name_map(arch.model_arch, config["num_hidden_layers"])
    layout = []
    for entry in plan.entries:
        key = arch.rename(entry.name)
        if key is None or arch.skip(config, key):
            continue
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"{plan.base_dir}: tensor {entry.name} has no GGUF name for the {arch.name} "
                                  "architecture; this model variant is not supported")
        layout.append((entry.name, name, tuple(entry.shape)))
    tied = all(name != "output.weight" for _, name, _ in layout)  # llama.cpp: token_embd is the output then
    heads = config["num_attention_heads"]
    return [(key, name, tensor_type(out_type, name, shape, n_layers=config["num_hidden_layers"], tied=tied,
                                    arch=arch.name, n_head=heads, n_head_kv=config.get("num_key_value_heads") or heads),
             shape) for key, name, shape in layout]


def _ggml_type(kind: str):
    return _gguf().GGMLQuantizationType[kind.upper()]  # f32, f16, bf16, q8_0, q4_k ...


def _add_tensor_info(writer, name: str, kind: str, shape: tuple[int, ...]) -> None:
    gguf = _gguf()
    if kind in ("f32", "f16"):
        np_dtype = np.float32 if kind == "f32" else np.float16
        writer.add_tensor_info(name, shape, np.dtype(np_dtype), int(np.prod(shape)) * np.dtype(np_dtype).itemsize)
        return
    byte_shape = gguf.quant_shape_to_byte_shape(shape, _ggml_type(kind))
    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=_ggml_type(kind))


def _convert(tensor: torch.Tensor, kind: str, name: str = "tensor", from_f16: bool = False) -> np.ndarray:
    if from_f16 and kind != "f32":  # llama-quantize reads the f16 file: quantize exactly those values
        tensor = tensor.to(torch.float16)
    array = tensor.float().numpy()
    if kind == "f32":
        return array
    if kind == "f16":
        return array.astype(np.float16)
    if kind == "bf16":
        return _gguf().quants.quantize(array, _ggml_type(kind))
    return quantize(array, kind, name=name)


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
        out_type: f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q5_0 or q4_0 for the 2-D weights (norms and
            biases stay F32); the per-tensor types of the last five are llama-quantize's (``gguf.mix``).
        modelfile: also write an Ollama ``Modelfile`` beside the GGUF file.
        merge_base, bits, quant_type, double_quant: as for ``merge.write.merge_adapter``.
        overwrite: replace an existing GGUF file at ``output_file`` (and a Modelfile beside it). Without
            it an existing file is refused; a file of the model or adapter folder itself is refused either way.
        echo: called with the one-line summary of the read-back check (e.g. ``click.echo``), then,
            with a line naming the matrices that fell back to another type (``row_fallbacks``) if any.

    Returns:
        The GGUF path.

    Raises:
        errors.MergeVerificationError: the merge with ``adapter_dir`` failed its check (nothing written).
        GGUFExportError: unsupported architecture, tokenizer or tensor; a model setting llama.cpp
            would compute differently (``gguf.architectures``); bad output type; an output that
            exists (without ``overwrite``) or belongs to the model or adapter folder; a Modelfile
            already beside the output without ``overwrite``.
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
    arch = architecture(model_dir, config)
    config = arch.text_config(config)
    tok_dir = Path(adapter_dir) if adapter_dir and (Path(adapter_dir) / "tokenizer.json").exists() else model_dir
    if adapter_dir is not None:  # the verified merge first, then the export of what it wrote
        output.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.merge-"))
        try:
            merged = work / "merged"
            merge_adapter(model_dir, adapter_dir, merged, merge_base=merge_base, dtype=MERGE_DTYPE[out_type],
                          progress=progress, bits=bits, quant_type=quant_type, double_quant=double_quant)
            return _export(merged, output, config, arch, out_type, tok_dir, modelfile, progress, echo)
        except MergeVerificationError:
            raise  # its message names the .failed folder kept in ``work`` for inspection
        finally:
            if not (work / "merged.failed").exists():
                shutil.rmtree(work, ignore_errors=True)
    return _export(model_dir, output, config, arch, out_type, tok_dir, modelfile, progress, echo)


def architecture(model_dir: Path, config: dict) -> Architecture:
    """The family ``config`` belongs to, once it is known llama.cpp computes what transformers does.

    Raises:
        GGUFExportError: a model type not written here (naming those that are), or settings llama.cpp
            cannot represent (each one listed).
    """
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(f"{model_dir}: model type {model_type!r} cannot be exported to GGUF yet; supported: "
                              f"{', '.join(sorted(ARCHITECTURES))} (for others use llama.cpp's convert_hf_to_gguf.py "
                              "on the merged folder from `qlora-lite merge`)")
    arch = ARCHITECTURES[model_type]
    problems = arch.problems(arch.text_config(config))
    if problems:
        raise GGUFExportError(f"{model_dir}: this {model_type} model cannot be written as a GGUF file llama.cpp "
                              f"computes the same way (nothing was written):{format_problems(problems)}")
    return arch


def _export(model_dir: Path, output: Path, config: dict, arch: Architecture, out_type: str, tok_dir: Path,
            modelfile: bool, progress: bool, echo) -> Path:
    """``export_gguf`` of a folder with nothing left to merge (checks done)."""
    plan = plan_merge(model_dir)
    for note in plan.notes:
        log.warning(note)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    try:
        expected = _write(tmp, plan, config, arch, out_type, tok_dir, progress)
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
    fallbacks = row_fallbacks(expected.tensors, out_type)
    if echo is not None:
        echo(summary)
        if fallbacks:
            echo(fallbacks)
    if modelfile:
        write_modelfile(output, tok_dir, model_dir)
    return output


def row_fallbacks(tensors: dict[str, tuple[str, tuple[int, ...]]], out_type: str, shown: int = 5) -> str:
    """A line naming the matrices written in another type than ``out_type``'s because their rows do not
    split into its blocks (32 values for Q8_0/Q4_0/Q5_0, 256 for the K-quants), or "" when there are none.

    Args:
        tensors: GGUF name -> (kind, shape), as planned (``gguf.verify.ExpectedGGUF.tensors``).
    """
    main = EXPORT_TYPES[out_type][0]
    if main not in BLOCKS:
        return ""  # f16, bf16: nothing falls back
    block = BLOCKS[main][0]
    matrices = {name: entry for name, entry in tensors.items() if len(entry[1]) > 1}
    fell = [(name, shape[-1], kind) for name, (kind, shape) in matrices.items() if shape[-1] % block]
    if not fell:
        return ""
    more = f" and {len(fell) - shown} more" if len(fell) > shown else ""
    if out_type == "q8_0":  # convert_hf_to_gguf.py keeps those in F16
        listed = [f"{name} ({per_row} per row)" for name, per_row, _ in fell]
        what, who = f"kept {len(fell)} of {len(matrices)} weight matrices in F16", "llama.cpp"
    else:
        listed = [f"{name} ({per_row} per row: {kind.upper()})" for name, per_row, kind in fell]
        what, who = f"wrote {len(fell)} of {len(matrices)} weight matrices in other types", "llama-quantize"
    return (f"note: {out_type} {what}, their rows not a multiple of {main.upper()}'s {block}-value blocks ({who} "
            f"does the same): {', '.join(listed[:shown])}{more}")


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


def _write(path: Path, plan: MergePlan, config: dict, arch: Architecture, out_type: str, tok_dir: Path,
           progress: bool):
    """Write the GGUF file ``path`` (header, metadata, streamed tensors) and fsync it.

    Returns:
        ``gguf.verify.ExpectedGGUF``: the planned tensors, the metadata handed to the writer and the
        CRC-32 of every tensor's bytes, for the read-back check.
    """
    layout = _layout(plan, arch, out_type)
    extra = arch.extra_tensors(config)  # made from the config (RoPE factors), written first
    planned = [(name, "f32", tuple(tensor.shape)) for name, tensor in extra.items()]
    planned += [(name, kind, shape) for _, name, kind, shape in layout]
    expected = ExpectedGGUF(arch.name, {name: (kind, shape) for name, kind, shape in planned},
                            required_keys=arch.required_keys)
    writer = _gguf().GGUFWriter(path, arch.name)
    try:
        _add_hparams(writer, config, arch, out_type, plan.base_dir.name)
        expected.specials = add_tokenizer(writer, tok_dir, config["vocab_size"])
        for name, kind, shape in planned:
            _add_tensor_info(writer, name, kind, shape)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        expected.metadata = dict(writer.kv_data[0])
        for name, tensor in extra.items():
            writer.write_tensor_data(expected.record(name, tensor.numpy()))
        names = {key: (name, kind) for key, name, kind, _ in layout}
        for key, tensor in iter_merged_tensors(plan, progress):
            if key in names:
                name, kind = names[key]
                converted = _convert(arch.transform(config, key, tensor), kind, name, out_type in FROM_F16)
                writer.write_tensor_data(expected.record(name, converted))
    finally:
        writer.close()
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # the check must read what is on disk, and the rename must not outrun the data
    return expected
