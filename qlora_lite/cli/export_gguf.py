"""``qlora-lite export-gguf``: write a GGUF file for llama.cpp / Ollama."""

from __future__ import annotations

import logging

import click


@click.command("export-gguf")
@click.option("--model", "model", required=True,
              help="Model folder: a merged folder from `qlora-lite merge`, or the base when --adapter is given.")
@click.option("--adapter", "adapter", default=None,
              help="Adapter to merge on the way (streamed tensor by tensor, no temporary model folder).")
@click.option("--output", "output", required=True, help="GGUF file to write, e.g. model.gguf.")
@click.option("--type", "out_type", type=click.Choice(["f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Storage of the weight matrices (norms and biases stay F32).")
@click.option("--modelfile", is_flag=True, help="Also write an Ollama Modelfile beside the GGUF file.")
@click.option("--merge-base", type=click.Choice(["dequantized", "original"]), default="dequantized",
              show_default=True, help="With --adapter: merge into the dequantized training base or the 16-bit one.")
@click.option("--bits", type=click.Choice(["4", "8", "16"]), default=None,
              help="With a PEFT --adapter lacking qlora_lite.json: bits of the base it was trained on (default 4).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(model, adapter, output, out_type, modelfile, merge_base, bits, quiet):
    """Write a GGUF file (Llama, Mistral, Qwen2) with tokenizer, special tokens and chat template.

    Tensors are streamed one at a time, so memory stays near one tensor even for large models.
    q8_0 quantizes the weight matrices to 8 bits in blocks of 32 (as llama.cpp's Q8_0).
    With --adapter the merge (the same code as `qlora-lite merge`) is not checked against
    base+adapter here; for a checked merge run `qlora-lite merge` first and export its folder.
    """
    from ..adapter import AdapterError
    from ..export import MergeError
    from ..gguf_export import GGUFExportError, export_gguf
    from ..quant import ModelLoadError
    from ..safetensors_io import SafetensorsError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        path = export_gguf(model, output, adapter_dir=adapter, out_type=out_type, modelfile=modelfile,
                           merge_base=merge_base, bits=int(bits) if bits else None, progress=not quiet)
    except (GGUFExportError, MergeError, AdapterError, ModelLoadError, SafetensorsError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {out_type})")
    if modelfile:
        click.echo(f"wrote {path.with_name('Modelfile')} (run: ollama create NAME -f {path.with_name('Modelfile')})")
