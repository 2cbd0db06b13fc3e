"""Check the GPU paths on a machine with one CUDA GPU: what the CPU test suite cannot reach.

    python tools/check_cuda.py                 # on the GPU (a few seconds after the imports)
    python tools/check_cuda.py --device cpu    # the same checks on the CPU (a dry run of this script)

Checks, on a tiny random llama built here (no download):

1. the fused 4-bit + LoRA autograd path gives the plain path's loss and LoRA gradients, in bf16 and
   in fp16 compute (fp16 trains fp32 LoRA weights, as ``qlora-lite train`` does with a scaler);
2. every checkpoint policy gives the same gradients, and ``speed`` runs no more projection matmuls
   than no checkpointing at all;
3. the chunked loss equals ``model(..., labels=...).loss``;
4. ``qlora-lite demo`` learns its task on the device (exact match after training).

Prints one line per check and exits 1 if any fails. For the speed and memory comparison on the GPU
run ``tools/benchmark.py`` (it measures with ``torch.cuda.max_memory_allocated`` there).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _tiny_llama(folder: Path) -> Path:
    from tiny_models import make_tiny_model, train_tiny_tokenizer

    return make_tiny_model("llama", folder / "model", train_tiny_tokenizer(folder / "tok"))


def _step(model, ids, device, fused: bool, chunked: bool = True):
    from qlora_lite.kernels import chunked_loss, lora_4bit
    from qlora_lite.model import lora

    lora.fast_lora_applies = lora_4bit.fast_lora_applies if fused else (lambda layer, x: False)
    try:
        loss = (chunked_loss.causal_lm_loss(model, ids, ids, chunk=16) if chunked
                else model(input_ids=ids, labels=ids).loss)
        loss.backward()
    finally:
        lora.fast_lora_applies = lora_4bit.fast_lora_applies
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _close(a: dict, b: dict, rtol: float) -> float:
    """Largest gradient difference relative to the largest gradient."""
    scale = max(v.abs().max().item() for v in b.values())
    return max((a[k] - b[k]).abs().max().item() for k in b) / max(scale, 1e-12) if a.keys() == b.keys() else 1e9


def _model(path, device, compute="bf16", lora_dtype="bf16", policy="balanced", checkpointing=True):
    from qlora_lite.model.build import build_model

    model = build_model(str(path), bits=4, rank=8, dropout=0.0, seed=0, compute_dtype=compute, lora_dtype=lora_dtype,
                        gradient_checkpointing=checkpointing, checkpoint_policy=policy).to(device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def check_fused(path, device, ids) -> list[tuple[str, bool, str]]:
    from qlora_lite.kernels.lora_4bit import fast_lora_applies
    from qlora_lite.model.loading import DTYPES
    from qlora_lite.model.lora import lora_layers

    rows = []
    for compute, lora_dtype, tol in (("bf16", "bf16", 0.05), ("fp16", "fp32", 0.05)):
        model = _model(path, device, compute, lora_dtype)
        loss_fast, g_fast = _step(model, ids, device, fused=True)
        loss_plain, g_plain = _step(model, ids, device, fused=False)
        err = _close(g_fast, g_plain, tol)
        ok = abs(loss_fast - loss_plain) < 1e-2 and err < tol and all(v.isfinite().all() for v in g_fast.values())
        # fp16 trains fp32 LoRA weights, which the fused path does not take: that row checks the plain path.
        layer = next(iter(lora_layers(model).values()))
        x = torch.zeros(1, layer.in_features, dtype=DTYPES[compute], device=device)
        fused = fast_lora_applies(layer, x)
        rows.append((f"{compute} compute: fused 4-bit LoRA == plain path", ok,
                     f"fused path used: {'yes' if fused else 'no'}; loss {loss_fast:.4f} vs {loss_plain:.4f}, "
                     f"grad diff {err:.2e} of max"))
    return rows


def check_policies(path, device, ids) -> list[tuple[str, bool, str]]:
    from tiny_models import ProjectionMatmuls

    results = {}
    for policy in ("memory", "balanced", "speed", None):
        model = _model(path, device, policy=policy or "balanced", checkpointing=policy is not None)
        with ProjectionMatmuls() as matmuls:
            step = _step(model, ids, device, fused=True)
        results[policy] = (step, matmuls.count)
    (_, base), _ = results[None]
    err = max(_close(results[p][0][1], base, 0.05) for p in ("memory", "balanced", "speed"))
    counts = {p: results[p][1] for p in results}
    ok = err < 0.05 and counts["speed"] == counts[None] < counts["balanced"] < counts["memory"]
    return [("checkpoint policies: same gradients, speed recomputes no projection", ok,
             f"grad diff {err:.2e}; projection matmuls {counts}")]


def check_loss(path, device, ids) -> list[tuple[str, bool, str]]:
    model = _model(path, device)
    chunked, _ = _step(model, ids, device, fused=True, chunked=True)
    full, _ = _step(model, ids, device, fused=True, chunked=False)
    return [("chunked loss == model(labels=...).loss", abs(chunked - full) < 1e-2, f"{chunked:.5f} vs {full:.5f}")]


def check_demo(device, folder: Path) -> list[tuple[str, bool, str]]:
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    command = [sys.executable, "-c", "from qlora_lite.cli import main; main()", "demo", "--output", str(folder / "demo")]
    result = subprocess.run(command,
                            capture_output=True, text=True, env={**os.environ, **env}, timeout=900)
    tuned = [line for line in result.stdout.splitlines() if "tuned:" in line]
    ok = result.returncode == 0 and bool(tuned) and "exact match 100%" in tuned[0]
    return [("qlora-lite demo learns its task", ok, tuned[0].strip() if tuned else result.stderr[-300:])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--no-demo", action="store_true", help="skip the demo run")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu for a dry run")
        return 2
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0)).to(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = _tiny_llama(Path(tmp))
        for check in (check_fused, check_policies, check_loss):
            rows += check(path, args.device, ids)
        if not args.no_demo:
            rows += check_demo(args.device, Path(tmp))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    for title, ok, detail in rows:
        print(f"{'PASS' if ok else 'FAIL'}  {title}: {detail}")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
