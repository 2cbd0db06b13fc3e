"""``--report-to``: the numbers of metrics.jsonl, and the run's config, also go to TensorBoard, W&B or
MLflow, through accelerate's trackers (only the main process writes).

Logs land in ``--output/tracking`` (W&B keeps its local files there too; MLflow sends its runs where
MLFLOW_TRACKING_URI says, as MLflow users expect, and keeps artifacts there). A resumed run
drops TensorBoard events after its checkpoint's step, as metrics.jsonl drops those lines. W&B without
network logs offline (``wandb sync`` uploads it later) instead of failing the run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from pathlib import Path

from qlora_lite.checkpoint.resume import TRACKING_DIR
from qlora_lite.config import Config
from qlora_lite.errors import ConfigError
from qlora_lite.flag_values import TRACKERS, report_targets

log = logging.getLogger(__name__)
WANDB_HOST = ("api.wandb.ai", 443)


def requested_trackers(report_to: str) -> list[str]:
    """The trackers ``--report-to`` names, each checked to be installed (before any model loads).

    Raises:
        ConfigError: a tracker's package is missing (the message says which extra installs it).
    """
    names = report_targets(report_to)
    missing = [n for n in names if n in TRACKERS and importlib.util.find_spec(n) is None]
    if missing:
        extras = ",".join(missing)
        raise ConfigError(f"--report-to {', '.join(missing)}: the package is not installed; "
                          f"pip install 'qlora-lite[{extras}]' (or pass --report-to none)")
    return names


def flat_config(settings: dict) -> dict[str, bool | int | float | str]:
    """``Config.to_dict()`` as ``{"model.bits": 4, ...}``; None becomes "none" (hparams take no None)."""
    return {f"{section}.{key}": ("none" if value is None else value)
            for section, values in settings.items() for key, value in values.items()}


def _online(host: tuple[str, int] = WANDB_HOST, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def start_trackers(accelerator, config: Config, names: list[str], step: int) -> None:
    """Start the trackers of ``names`` (the accelerator was built with ``log_with=names``) and store the config.

    Args:
        step: the step the run continues from (0 for a new run); later TensorBoard events are dropped.
    """
    if not names:
        return
    folder = Path(config.train.output) / TRACKING_DIR
    init_kwargs: dict[str, dict] = {}
    if "tensorboard" in names and step > 0:
        init_kwargs["tensorboard"] = {"purge_step": step + 1}
    if "wandb" in names:
        init_kwargs["wandb"] = {"dir": str(folder)}
        if not os.environ.get("WANDB_MODE") and accelerator.is_main_process and not _online():
            log.warning("--report-to wandb: no network; logging offline to %s (upload it later with `wandb sync`)",
                        folder)
            init_kwargs["wandb"]["mode"] = "offline"
    if "mlflow" in names:  # runs go where MLFLOW_TRACKING_URI says (the user's server); artifacts here
        init_kwargs["mlflow"] = {"logging_dir": str(folder)}
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(Path(config.train.output).name or "qlora-lite", config=flat_config(config.to_dict()),
                              init_kwargs=init_kwargs)


def log_record(accelerator, record: dict) -> None:
    """The metrics.jsonl ``record`` of one step, at its step."""
    if accelerator.trackers:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def finish_trackers(accelerator) -> None:
    """Flush and close the trackers (not ``end_training``: that also ends the process group)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
