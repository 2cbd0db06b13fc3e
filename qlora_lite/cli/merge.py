"""``qlora-lite merge``: fold an adapter into its base and write a plain Hugging Face model folder."""

from __future__ import annotations

import logging

import click

from qlora_lite.merge.verify import PROBE_TOLERANCE


@click.command("merge")
@click.option("--model", "model", required=True, metavar="DIR",
              help="Base model folder the adapter was trained on; `demo` is the bundled demo model.")
@click.option("--adapter", "adapter", required=True, metavar="DIR",
              help="Adapter folder (ours or one written by PEFT).")
@click.option("--output", "output", required=True, metavar="DIR",
              help="Folder to write; must not be the base folder or inside it.")
@click.option("--merge-base", type=click.Choice(["dequantized", "original"]), default="dequantized", show_default=True,
              help="dequantized: the quantized weights the adapter was trained against (the merged model behaves "
                   "like base+adapter did in training); original: the 16-bit checkpoint as it is.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="Dtype of the written weights.")
@click.option("--max-shard-size", default="2GB", show_default=True, metavar="SIZE",
              help="Largest output shard, e.g. 2GB, 500MB or 2G (GiB); a bare number is bytes.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Before reporting success, compare every merged tensor, as it is written, with W + scale * B @ A "
                   "computed anew from the base (a correct merge differs only by rounding to --dtype: half a unit "
                   "in its last place, plus fp32 arithmetic rounding, bounded; tensors without an adapter must be "
                   "bit-identical), read the files back against the checked bytes, then run a probe input through "
                   "the merged folder and the base in fp32, one decoder block in memory at a time. --no-verify "
                   "skips all three: only to inspect an output, not to ship it.")
@click.option("--tolerance", type=float, default=None,
              help="Largest allowed |logit difference| of the probe forward, which runs in fp32 on the same "
                   f"weights, so it only catches layout mistakes (default: {PROBE_TOLERANCE:g} times the largest "
                   "reference logit). The per-tensor bound follows from the dtypes and has no option.")
@click.option("--bits", type=click.Choice(["4", "8", "16"]), default=None,
              help="Bits of the base the adapter was trained on. Read from qlora_lite.json beside the adapter; "
                   "needed only for PEFT adapters (default then 4).")
@click.option("--quant-type", type=click.Choice(["nf4", "fp4"]), default=None,
              help="4-bit data type of the training base (as --bits; default nf4).")
@click.option("--double-quant/--no-double-quant", default=None,
              help="Whether the training base used double quantization (as --bits; default on).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output folder (only after the new merge passed).")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, show_default=True,
              help="Run Python code shipped in the model folder. Only if you trust it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(model, adapter, output, merge_base, dtype, max_shard_size, verify, tolerance, bits, quant_type,
            double_quant, overwrite, trust_remote_code, quiet):
    """Merge an adapter into its base and write a model folder plain `transformers` loads.

    The base is streamed tensor by tensor on the CPU (peak memory: a few tensors, not the model;
    no GPU needed). Each target weight becomes W + scale * B @ A computed in fp32, written as sharded
    safetensors with an index, config, tokenizer (chat template included) and generation config.
    The folder is written under a temporary name and renamed into place only after verification;
    a merge that fails it is left as OUTPUT.failed and the command exits with status 1.
    """
    from qlora_lite.merge.write import merge_adapter

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    report = merge_adapter(
        model, adapter, output, merge_base=merge_base, dtype=dtype, max_shard_size=max_shard_size,
        verify=verify, progress=not quiet, tolerance=tolerance, bits=int(bits) if bits else None,
        quant_type=quant_type, double_quant=double_quant, overwrite=overwrite,
        trust_remote_code=trust_remote_code,
    )
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if report.max_abs_logit_diff is None:
        click.echo("verification skipped (--no-verify)")
    else:
        click.echo(f"verified: {report.tensors_checked} tensors equal W + scale * B @ A within {dtype} rounding "
                   f"(closest: {report.worst_tensor} at {report.worst_ratio:.2g} of its bound); probe largest "
                   f"|logit difference| vs base+adapter = {report.max_abs_logit_diff:.4g} "
                   f"(tolerance {report.tolerance:.4g})")
    click.echo(f"merged model ({report.merge_base} base, {dtype}, {report.shards} shard(s)) written to "
               f"{report.output_dir} in {report.seconds:.1f} s")
