"""--report-to: TensorBoard (and W&B offline) get the very numbers of metrics.jsonl, plus the config."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from tiny_models import write_chat_jsonl

from qlora_lite.cli import main
from qlora_lite.train.metrics import read_metrics


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``folder``: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(folder.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_the_metrics_jsonl_numbers_and_the_config_and_a_resume_replaces_the_tail(
        tiny_llama, tmp_path, one_thread, ctrl_c_after):
    pytest.importorskip("tensorboard")
    data, out = write_chat_jsonl(tmp_path / "train.jsonl", n=12), tmp_path / "run"
    args = ("train", "--model", tiny_llama, "--data", data, "--output", out, "--bits", 16, "--rank", 4,
            "--max-seq-len", 64, "--batch-size", 2, "--max-steps", 5, "--save-steps", 2, "--optimizer", "adamw",
            "--eval-fraction", 0.2, "--eval-steps", 2, "--report-to", "tensorboard")
    with ctrl_c_after(3):  # steps 1-3 logged, checkpoint at 2: step 3 runs again
        assert invoke(*args).exit_code == 1
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    metrics = read_metrics(out)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5]
    logged = scalars(out / "tracking" / "run")  # the run is named after its --output folder
    keys = {k for r in metrics for k in r} - {"step"}
    assert keys >= {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes", "epoch", "eval_loss", "eval_ppl"}
    assert set(logged) == keys
    for key in keys:  # each step once (the stopped run's step 3 was purged), the value of metrics.jsonl
        expected = [(r["step"], r[key]) for r in metrics if key in r]
        assert [s for s, _ in logged[key]] == [s for s, _ in expected], key
        assert [v for _, v in logged[key]] == pytest.approx([v for _, v in expected], rel=1e-6), key
    hparams = [yaml.safe_load(p.read_text()) for p in (out / "tracking").rglob("hparams.yml")]
    assert hparams and hparams[-1]["lora.rank"] == 4 and hparams[-1]["data.data"] == str(data)


def _train_reporting_to(tracker: str, model, tmp_path, out):
    """Two steps of a tiny 16-bit run into ``out`` with ``--report-to tracker``."""
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=4)
    return invoke("train", "--model", model, "--data", data, "--output", out, "--bits", 16, "--rank", 4,
                  "--max-seq-len", 64, "--batch-size", 2, "--max-steps", 2, "--optimizer", "adamw",
                  "--report-to", tracker)


def test_wandb_without_network_logs_offline_into_the_output(tiny_llama, tmp_path, one_thread, monkeypatch):
    pytest.importorskip("wandb")
    from qlora_lite.train import tracking

    monkeypatch.setattr(tracking, "WANDB_HOST", ("127.0.0.1", 9))  # nothing listens there: no network
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    result = _train_reporting_to("wandb", tiny_llama, tmp_path, out)
    assert result.exit_code == 0, result.output
    runs = list((out / "tracking" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((out / "tracking").rglob("*"))


def test_missing_tracker_package_is_a_message_before_loading(tiny_llama, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=4)
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_llama), "--data", str(data), "--output",
                                       str(tmp_path / "run"), "--report-to", "tensorboard"])
    assert result.exit_code != 0
    assert "pip install 'qlora-lite[tensorboard]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_mlflow_gets_the_metrics_jsonl_numbers(tiny_llama, tmp_path, one_thread, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    store = (tmp_path / "mlruns").as_uri()  # a file store: the test needs no database or server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    result = _train_reporting_to("mlflow", tiny_llama, tmp_path, out)
    assert result.exit_code == 0, result.output
    client = mlflow.tracking.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    assert history == [(r["step"], pytest.approx(r["loss"])) for r in read_metrics(out)]
    assert run.data.params["lora.rank"] == "4"
