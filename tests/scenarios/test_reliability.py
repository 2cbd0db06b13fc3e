"""End-to-end crash safety of ``qlora-lite train`` on a tiny 4-bit model (issue 7).

Real SIGKILLs of a training subprocess at points inside checkpoint writes (the subprocess wraps the
file operation of that point and SIGKILLs itself right after it), then ``--resume``:
the run continues from the newest complete checkpoint and ends exactly where an uninterrupted run
ends (per-step loss and lr within 1e-6, identical adapter). Also: refused resumes, NaN stop, and a
train -> resume -> merge run with unpickling disabled.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_lite.checkpoint.folder import COMPLETE_MARKER, latest_checkpoint, list_checkpoints
from qlora_lite.config import load_config
from qlora_lite.errors import CheckpointError

# Dropout, shuffling (seeded per epoch), grad accumulation and an epoch boundary (4 steps per epoch);
# rank 64 so bitsandbytes keeps real uint8 optimizer states (it uses fp32 below 4096 elements).
SETTINGS = {"bits": 4, "rank": 64, "alpha": 128.0, "dropout": 0.1, "batch_size": 2, "grad_accum": 2,
            "max_steps": 6, "save_steps": 2, "optimizer": "adamw_8bit", "max_seq_len": 32, "lr": 1e-3,
            "seed": 3, "warmup_steps": 1, "format": "text"}
WORDS = "the quick brown fox jumps over the lazy dog add two numbers plus minus equals hello how are you".split()
# SIGKILL inside the checkpoint write of step {step}: right after checkpoint-{step} is renamed into place
# (before its COMPLETE marker), or when rotation starts deleting an older checkpoint (its marker gone).
KILL_AT = {
    "renamed": (
        "import os, signal\nfrom pathlib import Path\n_rename = os.rename\n"
        "def _renamed(src, dst):\n    _rename(src, dst)\n"
        "    if Path(dst).name == 'checkpoint-{step}':\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.rename = _renamed\n"),
    "rotating": (
        "import os, shutil, signal\nfrom pathlib import Path\n_rmtree = shutil.rmtree\n"
        "def _removing(path, *a, **k):\n    path = Path(path)\n"
        "    if (path.name != 'checkpoint-{step}' and path.name.startswith('checkpoint-')\n"
        "            and (path.parent / 'checkpoint-{step}' / 'COMPLETE').exists()):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n    return _rmtree(path, *a, **k)\n"
        "shutil.rmtree = _removing\n"),
}
NO_PICKLE = ("import pickle\n"
             "def _refuse(*a, **k):\n    raise AssertionError('unpickling attempted')\n"
             "class _Refuse(pickle.Unpickler):\n    def __init__(self, *a, **k):\n        _refuse()\n"
             "pickle.loads = pickle.load = _refuse\npickle.Unpickler = _Refuse\n"
             "from qlora_lite.cli import main\nmain()\n")


def _write_data(path: Path, seed: int, n: int = 16) -> Path:
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))}) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(model: Path, data: Path, output: Path, **changes) -> list[str]:
    values = {**SETTINGS, **changes, "model": model, "data": data, "output": output}
    return [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


def _config(model: Path, data: Path, output: Path, **changes):
    return load_config(None, {**SETTINGS, **changes, "model": str(model), "data": str(data), "output": str(output)})


def _start_killed_run(model, data, output, crash_at: str, **changes) -> subprocess.Popen:
    """Start ``qlora-lite train`` (unpickling disabled) in a subprocess that SIGKILLs itself at
    ``crash_at`` (``"STEP:PHASE"``, a ``KILL_AT`` phase; empty: never)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    step, _, phase = crash_at.partition(":")
    prelude = KILL_AT[phase].replace("{step}", step) if crash_at else ""
    return subprocess.Popen([sys.executable, "-c", prelude + NO_PICKLE, "train", *_args(model, data, output, **changes)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when_exists(proc: subprocess.Popen, path: Path) -> threading.Thread:
    """SIGKILL ``proc`` from outside as soon as ``path`` appears (at whatever instant that happens to be)."""
    def watch():
        while proc.poll() is None and not path.exists():
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _wait_killed(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _assert_same_run(output: Path, reference: Path) -> None:
    got, want = _metrics(output), _metrics(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) <= 1e-6 and abs(g["lr"] - w["lr"]) <= 1e-6, (g, w)
    a, b = load_file(output / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def no_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    class Refuse(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refuse)


@pytest.fixture(scope="module")
def setup(one_thread, tiny_llama, tmp_path_factory):
    """Data, two training subprocesses killed inside checkpoint writes, and an uninterrupted reference
    run in this process (started together: the subprocesses spend most of their time importing)."""
    from qlora_lite.train.loop import train

    root = tmp_path_factory.mktemp("reliability")
    data = _write_data(root / "data.jsonl", seed=0)
    killed = {  # checkpoint-4 renamed into place, no marker yet / rotation deleting checkpoint-2
        "renamed": (root / "renamed", _start_killed_run(tiny_llama, data, root / "renamed", "4:renamed")),
        "rotating": (root / "rotating", _start_killed_run(tiny_llama, data, root / "rotating", "4:rotating",
                                                          save_total_limit=1)),
        "external": (root / "external", _start_killed_run(tiny_llama, data, root / "external", "")),
    }
    _kill_when_exists(killed["external"][1], root / "external" / "checkpoint-2" / COMPLETE_MARKER)
    reference = root / "reference"
    result = train(_config(tiny_llama, data, reference))
    assert result.steps == 6
    outputs = {}
    for name, (output, proc) in killed.items():
        _wait_killed(proc)
        outputs[name] = output
    return tiny_llama, data, reference, outputs


def test_kill_inside_checkpoint_write_then_resume_matches_and_merges_without_pickle(setup, tmp_path, no_pickle):
    from qlora_lite.train.loop import train

    model, data, reference, killed = setup
    output = killed["renamed"]
    assert (output / "checkpoint-4").is_dir() and not (output / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert list_checkpoints(output) == [output / "checkpoint-2"]
    assert latest_checkpoint(output) == output / "checkpoint-2"
    assert [r["step"] for r in _metrics(output)] == [1, 2, 3, 4]  # logged past the newest checkpoint
    states = load_file(output / "checkpoint-2" / "optimizer.safetensors")
    assert any(t.dtype == torch.uint8 for t in states.values())  # real 8-bit optimizer states in the checkpoint

    with pytest.raises(CheckpointError, match="--resume"):
        train(_config(model, data, output))  # an existing run is never overwritten by accident
    result = train(_config(model, data, output, resume=True))
    assert result.resumed_from == output / "checkpoint-2" and result.steps == 6
    _assert_same_run(output, reference)
    assert [p.name for p in list_checkpoints(output)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    # ... and the merge and the GGUF export of that run, still with unpickling refused.
    from qlora_lite.gguf.writer import export_gguf
    from qlora_lite.merge.write import merge_adapter

    report = merge_adapter(model, output, tmp_path / "merged", progress=False)
    assert (tmp_path / "merged" / "config.json").exists() and report.max_abs_logit_diff <= report.tolerance
    gguf_file = export_gguf(tmp_path / "merged", tmp_path / "model.gguf", progress=False)
    assert gguf_file.stat().st_size > 0


def test_kill_mid_rotation_keeps_newest_and_resumes(setup, tmp_path):
    from qlora_lite.train.loop import train

    model, data, reference, killed = setup
    output = killed["rotating"]
    # checkpoint-2 lost its marker (deletion started), checkpoint-4 is complete and is the one used
    assert list_checkpoints(output) == [output / "checkpoint-4"]
    assert not (output / "checkpoint-2" / COMPLETE_MARKER).exists()
    result = train(_config(model, data, output, resume=True, save_total_limit=1))
    assert result.resumed_from == output / "checkpoint-4"
    _assert_same_run(output, reference)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-6"]


def test_resume_with_changed_settings_is_refused(setup, tmp_path):
    from qlora_lite.train.loop import train

    model, data, reference, _ = setup
    other = _write_data(tmp_path / "other.jsonl", seed=1)
    with pytest.raises(CheckpointError) as info:
        train(_config(model, other, reference, resume=True, batch_size=4, seed=4))
    message = str(info.value)
    for part in ("dataset changed (sha256", "batch size changed 2 -> 4", "seed changed 3 -> 4", "--output"):
        assert part in message
    assert [r["step"] for r in _metrics(reference)] == list(range(1, 7))  # nothing rewritten


def test_nan_loss_stops_within_one_step_and_saves_nothing_non_finite(setup, tmp_path, monkeypatch):
    from qlora_lite.train import loop as train_module

    model, data, _, _ = setup
    real, calls = train_module.batch_loss_sum, []

    def poisoned(model_, batch):
        loss, n = real(model_, batch)
        calls.append(1)
        return (loss * float("nan"), n) if len(calls) == 5 else (loss, n)  # 5th micro-batch: step 3

    monkeypatch.setattr(train_module, "batch_loss_sum", poisoned)
    output = tmp_path / "run"
    with pytest.raises(train_module.TrainingError) as info:
        train_module.train(_config(model, data, output))
    message = str(info.value)
    assert "step 3" in message and "checkpoint-2" in message and "nan" in message.lower()
    assert len(calls) == 5  # stopped at once: no further micro-batch
    assert list_checkpoints(output) == [output / "checkpoint-2"]
    weights = load_file(output / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (output / "adapter_model.safetensors").exists()


def test_external_sigkill_after_a_checkpoint_resumes_to_the_same_result(setup):
    """Killed from outside at an arbitrary instant after checkpoint-2 completed (mid-step, mid-write...)."""
    from qlora_lite.checkpoint.folder import verify_checkpoint
    from qlora_lite.train.loop import train

    model, data, reference, killed = setup
    output = killed["external"]
    newest = latest_checkpoint(output)
    assert newest is not None and newest.name in ("checkpoint-2", "checkpoint-4")
    for checkpoint in list_checkpoints(output):
        verify_checkpoint(checkpoint)
    result = train(_config(model, data, output, resume=True))
    assert result.resumed_from == newest
    _assert_same_run(output, reference)
