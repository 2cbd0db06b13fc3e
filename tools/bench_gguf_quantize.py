"""Side by side: our GGUF quantizer against llama.cpp's llama_model_quantize, on the 1.1B LLaMA shape.

Both start from the same f16 GGUF file (random weights, hidden 2048, 22 layers, 32 heads / 4 KV
heads, intermediate 5632, vocab 32000) and write a quantized file: llama.cpp through
llama-cpp-python's ``llama_model_quantize`` (no importance matrix), ours by reading each tensor,
choosing its type with ``gguf.mix.tensor_type`` and quantizing it with ``gguf.quantize.quantize``.
Then every tensor of the two files is compared (type, shape, bytes).

    python tools/bench_gguf_quantize.py [--type q4_k_m] [--threads 2] [--layers 22] [--out DIR]

Prints both times (wall and CPU seconds of all threads; on a busy machine the CPU times are the
fairer comparison), the ratios ours / llama.cpp (target: at most 2) and the byte comparison.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import time
from pathlib import Path

import gguf
import numpy as np

from qlora_lite.gguf.mix import EXPORT_TYPES, file_type, tensor_type
from qlora_lite.gguf.quantize import quantize

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> (rows, row length) of the 1.1B LLaMA shape, llama.cpp's file order."""
    kv = HIDDEN // HEADS * KV_HEADS
    out = {"output.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "token_embd.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        out.update({f"blk.{i}.attn_k.weight": (kv, HIDDEN), f"blk.{i}.attn_norm.weight": (HIDDEN,),
                    f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN), f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
                    f"blk.{i}.attn_v.weight": (kv, HIDDEN), f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
                    f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
                    f"blk.{i}.ffn_up.weight": (FFN, HIDDEN)})
    return out


def _hparams(writer: gguf.GGUFWriter, layers: int, kind: gguf.LlamaFileType) -> None:
    writer.add_name("bench-1.1b")
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(kind)


def write_f16(path: Path, layers: int) -> None:
    """The f16 input: random N(0, 0.02) matrices, norms of ones in F32, streamed tensor by tensor."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    _hparams(writer, layers, gguf.LlamaFileType.MOSTLY_F16)
    table = shapes(layers)
    for name, shape in table.items():
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for shape in table.values():
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, np.float32))
        else:
            writer.write_tensor_data((rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16))
    writer.close()


def quantize_ours(source: Path, target: Path, out_type: str, layers: int, threads: int) -> None:
    """Our pipeline on llama.cpp's job: read the f16 file, choose each type, quantize, write."""
    reader = gguf.GGUFReader(source)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    writer = gguf.GGUFWriter(target, "llama")
    _hparams(writer, layers, file_type(out_type))
    kinds = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the row length first
        kinds[t.name] = kind = tensor_type(out_type, t.name, shape, n_layers=layers, tied=tied, arch="llama",
                                           n_head=HEADS, n_head_kv=KV_HEADS)
        ggml = gguf.GGMLQuantizationType[kind.upper()]
        byte_shape = gguf.quant_shape_to_byte_shape(shape, ggml) if kind not in ("f32", "f16") else shape
        itemsize = {"f32": 4, "f16": 2}.get(kind, 1)
        writer.add_tensor_info(t.name, byte_shape, np.dtype({"f32": np.float32, "f16": np.float16}.get(kind, np.uint8)),
                               int(np.prod(byte_shape)) * itemsize, raw_dtype=None if itemsize > 1 else ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        data = np.asarray(t.data)
        if kinds[t.name] in ("f32", "f16"):
            writer.write_tensor_data(data)
        else:
            writer.write_tensor_data(quantize(data.astype(np.float32), kinds[t.name], threads=threads, name=t.name))
    writer.close()


def quantize_llama_cpp(source: Path, target: Path, out_type: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{out_type.upper()}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed on {source}")


def compare(ours: Path, reference: Path) -> str:
    """'N of M tensors identical', plus the differing tensors with their differing block counts."""
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(reference).tensors}
    if set(a) != set(b):
        return f"tensor names differ: {sorted(set(a) ^ set(b))}"
    bad = []
    for name, x in a.items():
        y = b[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            bad.append(f"{name} ({x.tensor_type.name} vs {y.tensor_type.name})")
        elif not np.array_equal(np.asarray(x.data), np.asarray(y.data)):
            size = gguf.GGML_QUANT_SIZES[x.tensor_type][1]
            rows = (np.asarray(x.data).reshape(-1, size) != np.asarray(y.data).reshape(-1, size)).any(axis=1)
            bad.append(f"{name} ({rows.sum()} of {rows.size} blocks)")
    return f"{len(a) - len(bad)} of {len(a)} tensors byte-identical" + (f"; differ: {', '.join(bad)}" if bad else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--type", dest="out_type", default="q4_k_m",
                        choices=[t for t in EXPORT_TYPES if t not in ("f16", "bf16")])
    parser.add_argument("--threads", type=int, default=2, help="for both (llama.cpp's nthread)")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--out", type=Path, default=Path("bench-out/gguf-quantize"))
    parser.add_argument("--keep", action="store_true", help="keep the three GGUF files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    f16, ref, ours = (args.out / f"{n}.gguf" for n in ("f16", f"llama-cpp-{args.out_type}", f"ours-{args.out_type}"))
    if not f16.exists():
        write_f16(f16, args.layers)
    wall, cpu = {}, {}
    for label, run in (("llama.cpp", lambda: quantize_llama_cpp(f16, ref, args.out_type, args.threads)),
                       ("ours", lambda: quantize_ours(f16, ours, args.out_type, args.layers, args.threads))):
        start, start_cpu = time.perf_counter(), sum(os.times()[:2])
        run()
        wall[label], cpu[label] = time.perf_counter() - start, sum(os.times()[:2]) - start_cpu
    print(f"{args.out_type}, 1.1B LLaMA shape ({args.layers} layers), {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f}: llama.cpp {wall['llama.cpp']:.1f} s wall / {cpu['llama.cpp']:.1f} s CPU, "
          f"ours {wall['ours']:.1f} s / {cpu['ours']:.1f} s; ours/llama.cpp {wall['ours'] / wall['llama.cpp']:.2f} "
          f"by wall, {cpu['ours'] / cpu['llama.cpp']:.2f} by CPU")
    print(compare(ours, ref))
    if not args.keep:
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
