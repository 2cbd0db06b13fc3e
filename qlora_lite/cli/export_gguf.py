"""``qlora-lite export-gguf``: write a GGUF file for llama.cpp / Ollama."""

from __future__ import annotations

import logging

import click


@click.command("export-gguf")
@click.option("--model", "model", required=True, metavar="DIR",
              help="Model folder: a merged folder from `qlora-lite merge`, or the base when --adapter is given.")
@click.option("--adapter", "adapter", default=None, metavar="DIR",
              help="Adapter to merge on the way: `qlora-lite merge`, with its check against base+adapter, into a "
                   "temporary folder beside --output (removed afterwards), then the export of that folder.")
@click.option("--output", "output", required=True, metavar="FILE", help="GGUF file to write, e.g. model.gguf.")
@click.option("--type", "out_type", default="f16", show_default=True,
              type=click.Choice(["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q5_0", "q4_0"]),
              help="Storage of the weight matrices (norms and biases stay F32); q6_k ... q4_0 as llama-quantize "
                   "makes them from the f16 file, per-tensor mix included.")
@click.option("--modelfile", is_flag=True, help="Also write an Ollama Modelfile beside the GGUF file.")
@click.option("--merge-base", type=click.Choice(["dequantized", "original"]), default="dequantized",
              show_default=True, help="With --adapter: merge into the dequantized training base or the 16-bit one.")
@click.option("--bits", type=click.Choice(["4", "8", "16"]), default=None,
              help="With a PEFT --adapter lacking qlora_lite.json: bits of the base it was trained on (default 4).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing GGUF file at --output and, with --modelfile, a Modelfile beside it "
                   "(files of the model or adapter folder never are).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(model, adapter, output, out_type, modelfile, merge_base, bits, overwrite, quiet):
    """Write a GGUF file (Llama, Mistral, Qwen2, Qwen3) with tokenizer, special tokens and chat template.

    Tensors are streamed one at a time, so memory stays near one tensor even for large models.
    q8_0 quantizes the weight matrices to 8 bits in blocks of 32 (as llama.cpp's Q8_0); a matrix
    whose rows are not a multiple of 32 stays F16, as in llama.cpp, and a note names each one.
    q6_k, q5_k_m, q4_k_m, q5_0 and q4_0 write the bytes `llama-quantize` writes from the f16
    export (no importance matrix): the same per-tensor types (the _M mixes give output.weight and
    some layers' attn_v / ffn_down Q6_K; rows that do not split into 256 values fall back to
    Q5_0, Q5_1 or Q8_0) and the same blocks. An adapter is merged in fp16 for them.

    The file is written under a temporary name, read back (memory-mapped) and checked: every
    tensor's name, type, shape and bytes (CRC-32), every metadata key, and the keys llama.cpp
    needs. Only then is it renamed to --output; a file that fails is kept as OUTPUT.failed and
    an existing --output is left as it was. An existing --output is replaced only with
    --overwrite, and never when it is a file of the model or adapter folder.

    With --adapter the adapter is first merged by `qlora-lite merge`'s own code, with its check
    (every merged tensor against base+adapter, the files read back, a probe forward), into a
    temporary folder beside --output, in the file's dtype (fp16 for the quantized types), which
    is removed afterwards; a merge that fails its check writes no GGUF byte and is kept where the
    message says. --modelfile also writes an Ollama Modelfile (TEMPLATE from the chat template,
    stop words, sampling settings) beside --output.
    """
    from qlora_lite.gguf.writer import export_gguf

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    path = export_gguf(model, output, adapter_dir=adapter, out_type=out_type, modelfile=modelfile,
                       merge_base=merge_base, bits=int(bits) if bits else None, overwrite=overwrite,
                       progress=not quiet, echo=click.echo)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {out_type})")
    if modelfile:
        click.echo(f"wrote {path.with_name('Modelfile')} (run: ollama create NAME -f {path.with_name('Modelfile')})")
