"""The metrics log of a run (``metrics.jsonl``) and its loss-curve PNG."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

from qlora_lite.errors import MetricsError

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
PREFERENCE_CURVES = ("rewards/accuracies", "rewards/margins", "eval_rewards/accuracies", "eval_rewards/margins")


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``, flushing each line.

    Flushing per line means a crashed run still leaves every logged step readable.
    """

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Keep only the lines of steps <= ``step`` (a resumed run rewrites what came after its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path, missing_ok=True) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path, missing_ok: bool = False) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (or of the one in a run folder).

    A torn last line (the run was killed mid-write) is ignored.

    Raises:
        MetricsError: the file does not exist (unless ``missing_ok``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.exists():
        if missing_ok:
            return []
        raise MetricsError(f"{path} does not exist: not a qlora-lite training output folder?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_loss(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw training loss (and eval loss where logged) against the optimizer step; for preference runs
    a second panel shows the reward margin and the preference accuracy.

    Args:
        run_dir: a training output folder holding ``metrics.jsonl`` (or the file itself).
        output: the PNG to write; default ``loss.png`` beside the metrics file.

    Returns:
        The PNG path.

    Raises:
        MetricsError: no metrics file, or no finite loss in it.
    """
    import matplotlib  # noqa: PLC0415 (slow to import; only when a plot is drawn)

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt  # noqa: PLC0415 (slow to import; only when a plot is drawn)

    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_NAME if run_dir.is_dir() else run_dir
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if _finite(r.get("loss"))]
    evals = [(r["step"], r["eval_loss"]) for r in records if _finite(r.get("eval_loss"))]
    if not train and not evals:
        raise MetricsError(f"{metrics_path} holds no finite loss to plot")
    output = Path(output) if output else metrics_path.parent / PLOT_NAME
    # Preference runs (--method dpo|orpo) also show the reward margin and the preference accuracy.
    preference = {key: [(r["step"], r[key]) for r in records if _finite(r.get(key))] for key in PREFERENCE_CURVES}
    preference = {key: points for key, points in preference.items() if points}
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(12 if preference else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if preference:
        side = axes[0][1]
        for key, points in preference.items():
            side.plot(*zip(*points), "o-" if key.startswith("eval_") else "-", label=key, linewidth=1.2)
        side.set_xlabel("optimizer step")
        side.set_ylabel("accuracy (fraction) / margin (nats x beta)")
        side.grid(alpha=0.3)
        side.legend()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" if preference else "loss (nats per token)")
    ax.set_title(f"qlora-lite: {metrics_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    return output


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated CUDA memory on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
