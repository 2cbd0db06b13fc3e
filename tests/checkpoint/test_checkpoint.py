"""Checkpoints: exact resume (weights, optimizer incl. bitsandbytes 8-bit, scheduler, RNG), damage
detection with fallback, marker semantics, rotation safety, disk-full handling, resume refusals,
output-folder guard, and no pickle anywhere in the package."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch

from qlora_lite.checkpoint.folder import (
    COMPLETE_MARKER,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from qlora_lite.checkpoint.resume import check_resume_compatible, guard_output_dir, make_fingerprint
from qlora_lite.checkpoint.run_folder import mark_run
from qlora_lite.checkpoint.state import capture_rng_state, restore_rng_state
from qlora_lite.errors import CheckpointError
from qlora_lite.model import adapter as adapter_module
from qlora_lite.model.build import build_model
from qlora_lite.model.lora import lora_layers

PACKAGE = Path(__file__).resolve().parents[2] / "qlora_lite"


def _model(path, seed=0):
    return build_model(str(path), bits=4, rank=8, alpha=16, dropout=0.2, seed=seed, gradient_checkpointing=False)


def _optimizer(kind, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    # min_8bit_size=1: every tensor gets uint8 states + absmax (the default keeps tiny ones in fp32)
    return bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.01, min_8bit_size=1)


def _scheduler(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))  # a lambda: not serialisable


def _batches(n):
    g = torch.Generator().manual_seed(123)
    return [torch.randint(3, 300, (2, 12), generator=g) for _ in range(n)]


def _step(model, optimizer, scheduler, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _fixed_gradient_steps(model):
    """The trainable parameters and ``step(optimizer)``, which applies the same random gradients every
    call: optimizer steps that depend only on the optimizer's state, not on a forward pass."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) for p in params]

    def step(optimizer):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()

    return params, step


def _lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def saved_run(tiny_llama, tmp_path_factory):
    """Two complete checkpoints (steps 1 and 2) of a tiny 4-bit run with AdamW8bit, in a template folder."""
    out = tmp_path_factory.mktemp("template")
    model = _model(tiny_llama)
    opt = _optimizer("adamw8bit", model)
    sched = _scheduler(opt)
    for step, ids in enumerate(_batches(2), start=1):
        _step(model, opt, sched, ids)
        save_checkpoint(out, step, model, opt, sched, {"step": step, "fingerprint": {"seed": 1}})
    return out


@pytest.fixture
def run_copy(saved_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(saved_run, out)
    return out


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_resume_gives_bit_identical_steps(tiny_llama, tmp_path, kind):
    batches = _batches(4)
    model = _model(tiny_llama)
    opt = _optimizer(kind, model)
    sched = _scheduler(opt)
    for ids in batches[:2]:
        _step(model, opt, sched, ids)
    path = save_checkpoint(tmp_path, 2, model, opt, sched, {"step": 2, "losses": [1.5, float("nan")]})
    lr_at_save = opt.param_groups[0]["lr"]
    reference = [_step(model, opt, sched, ids) for ids in batches[2:]]

    resumed = _model(tiny_llama, seed=7)  # different fresh LoRA init: everything must come from the checkpoint
    opt2 = _optimizer(kind, resumed)
    sched2 = _scheduler(opt2)
    state = load_checkpoint(path, resumed, opt2, sched2)
    assert state["step"] == 2 and state["losses"][0] == 1.5
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == lr_at_save == pytest.approx(1e-2 / 3)
    losses = [_step(resumed, opt2, sched2, ids) for ids in batches[2:]]
    assert losses == reference  # dropout masks, optimizer moments and lr all continue exactly
    for name, weight in _lora_weights(model).items():
        assert torch.equal(weight, _lora_weights(resumed)[name]), name


@pytest.mark.parametrize("cls", [bnb.optim.PagedAdamW8bit, bnb.optim.PagedAdamW32bit, bnb.optim.AdamW8bit])
def test_bnb_optimizer_state_round_trip(tmp_path, tiny_llama, cls):
    """Paged/8-bit states (uint8 state1/state2, qmap, absmax, int step) survive safetensors + JSON."""
    torch.manual_seed(0)
    model = _model(tiny_llama)
    params, step = _fixed_gradient_steps(model)
    opt = cls(params, lr=1e-3, min_8bit_size=1)
    step(opt)
    path = save_checkpoint(tmp_path, 1, model, opt, None, {"step": 1})
    assert not list(path.glob("*.pkl")) and not list(path.glob("*.pt")) and not list(path.glob("*.bin"))
    step(opt)
    expected = [p.detach().clone() for p in params]
    fresh = cls(params, lr=5.0, min_8bit_size=1)  # wrong lr on purpose: the saved one must win
    load_checkpoint(path, model, fresh)
    step(fresh)
    assert fresh.param_groups[0]["lr"] == 1e-3
    assert all(torch.equal(p, e) for p, e in zip(params, expected))


def test_rng_restore_reproduces_dropout_masks(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = capture_rng_state()
    first = (torch.nn.functional.dropout(torch.ones(64), 0.5), random.random(), np.random.rand())
    restore_rng_state(state)
    second = (torch.nn.functional.dropout(torch.ones(64), 0.5), random.random(), np.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


def test_load_restores_rng_saved_with_checkpoint(run_copy, tiny_llama):
    model = _model(tiny_llama)
    load_checkpoint(run_copy / "checkpoint-2", model)
    masks = [torch.nn.functional.dropout(torch.ones(32), 0.5) for _ in range(2)]
    draws = (random.random(), np.random.rand())
    load_checkpoint(run_copy / "checkpoint-2", model)
    assert all(torch.equal(a, torch.nn.functional.dropout(torch.ones(32), 0.5)) for a in masks)
    assert draws == (random.random(), np.random.rand())


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path):
    path.write_bytes(b"")


def _damage_header(path):
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xff" * 16  # same size, garbage in the JSON header
    path.write_bytes(bytes(data))


def _zero_data(path):
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = bytes(len(data) - start)  # same size, header intact, tensor bytes zeroed
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,damage", [
    ("adapter_model.safetensors", _zero_data), ("optimizer.safetensors", _zero_data),
    ("adapter_model.safetensors", _truncate), ("optimizer.safetensors", _truncate),
    ("trainer_state.json", _empty), ("optimizer.json", _empty), ("rng.safetensors", _damage_header),
    ("adapter_model.safetensors", _damage_header),
])
def test_damaged_newest_checkpoint_is_named_and_skipped(run_copy, tiny_llama, name, damage):
    bad = run_copy / "checkpoint-2" / name
    damage(bad)
    model = _model(tiny_llama)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(run_copy / "checkpoint-2", model, _optimizer("adamw8bit", model))
    message = str(info.value)
    assert str(bad) in message and "\n" not in message
    with pytest.warns(UserWarning, match=re.escape(name)) as record:
        assert latest_checkpoint(run_copy) == run_copy / "checkpoint-1"
    assert "checkpoint-1" in str(record[0].message)
    assert load_checkpoint(run_copy / "checkpoint-1", model)["step"] == 1


def test_same_size_damage_names_the_file_and_the_hash(run_copy):
    bad = run_copy / "checkpoint-2" / "rng.safetensors"
    _zero_data(bad)
    with pytest.raises(CheckpointError, match=re.escape(f"{bad}: content differs from what was written (SHA-256")):
        read_trainer_state(run_copy / "checkpoint-2")


def test_checkpoint_without_marker_is_never_used(run_copy, tiny_llama):
    (run_copy / "checkpoint-2" / COMPLETE_MARKER).unlink()
    (run_copy / "checkpoint-3.tmp").mkdir()  # a write killed before the rename
    assert list_checkpoints(run_copy) == [run_copy / "checkpoint-1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_checkpoint(run_copy) == run_copy / "checkpoint-1"
    with pytest.raises(CheckpointError, match="not complete"):
        load_checkpoint(run_copy / "checkpoint-2", _model(tiny_llama))


def test_all_damaged_returns_none(run_copy):
    for step in (1, 2):
        _empty(run_copy / f"checkpoint-{step}" / "trainer_state.json")
    with pytest.warns(UserWarning):
        assert latest_checkpoint(run_copy) is None


def test_rotation_keeps_newest(tiny_llama, tmp_path):
    model = _model(tiny_llama)
    opt = _optimizer("adamw", model)
    (tmp_path / "checkpoint-9").mkdir()  # incomplete leftover of a killed run: cleaned up
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model, opt, None, {"step": step}, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    save_checkpoint(tmp_path, 5, model, opt, None, {"step": 5}, total_limit=1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-5"]


class Killed(BaseException):
    """Stands in for SIGKILL: nothing catches it."""


def test_crash_mid_rotation_leaves_newest_complete(tiny_llama, tmp_path, monkeypatch):
    model = _model(tiny_llama)
    opt = _optimizer("adamw8bit", model)
    for step in range(1, 4):
        save_checkpoint(tmp_path, step, model, opt, None, {"step": step})
    real_rmtree, calls = shutil.rmtree, []

    def dying_rmtree(path, *args, **kwargs):
        calls.append(Path(path).name)
        if len(calls) > 1:
            raise Killed()
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dying_rmtree)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, 4, model, opt, None, {"step": 4}, total_limit=1)
    monkeypatch.undo()
    assert calls == ["checkpoint-1", "checkpoint-2"]
    # checkpoint-2 lost its marker before its deletion began, so only the newest counts
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-3", tmp_path / "checkpoint-4"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert load_checkpoint(tmp_path / "checkpoint-4", model, opt)["step"] == 4
    save_checkpoint(tmp_path, 5, model, opt, None, {"step": 5}, total_limit=1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-5"]


def _no_space_when_writing(monkeypatch, file_name):
    """os.write fails with ENOSPC on the file called ``file_name`` (as a full disk would)."""
    real_open, real_write, names = os.open, os.write, {}

    def tracking_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        names[fd] = Path(path).name
        return fd

    def write(fd, data):
        if names.get(fd) == file_name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("where", ["adapter", "optimizer", "marker"])
def test_disk_full_raises_and_keeps_older(run_copy, tiny_llama, monkeypatch, where):
    model = _model(tiny_llama)
    opt = _optimizer("adamw8bit", model)
    load_checkpoint(run_copy / "checkpoint-2", model, opt)
    if where == "adapter":
        def no_space(tensors, path, metadata=None):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        monkeypatch.setattr(adapter_module, "save_safetensors_atomic", no_space)
    else:
        _no_space_when_writing(monkeypatch, "optimizer.safetensors" if where == "optimizer" else "COMPLETE.tmp")
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(run_copy, 3, model, opt, None, {"step": 3}, total_limit=1)
    monkeypatch.undo()
    message = str(info.value)
    assert "No space left on device" in message and "checkpoint-3" in message and "\n" not in message
    expected = {"adapter": "adapter_model.safetensors", "optimizer": "optimizer.safetensors", "marker": "COMPLETE"}
    assert expected[where] in message
    assert sorted(p.name for p in run_copy.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert latest_checkpoint(run_copy) == run_copy / "checkpoint-2"
    assert load_checkpoint(run_copy / "checkpoint-2", model, opt)["step"] == 2


def test_non_finite_weights_are_not_saved(tiny_llama, tmp_path):
    model = _model(tiny_llama)
    layer = next(iter(lora_layers(model).values()))
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        save_checkpoint(tmp_path, 1, model, None, None, {"step": 1})
    assert list(tmp_path.iterdir()) == []


FP = {"dataset_sha256": "a" * 64, "batch_size": 2, "grad_accum": 2, "seed": 1, "model": "/m", "bits": 4,
      "rank": 8, "target_modules": "all-linear", "max_seq_len": 64, "packing": False, "lr": 2e-4,
      "max_steps": 10, "save_steps": 2, "logging_steps": 1, "num_processes": 1}


def test_resume_compatibility_refuses_and_warns():
    assert check_resume_compatible({"fingerprint": FP}, dict(FP)) == []
    changed = {**FP, "dataset_sha256": "b" * 64, "batch_size": 4, "seed": 2, "lr": 1e-4, "max_steps": 20}
    with pytest.raises(CheckpointError) as info:
        check_resume_compatible({"fingerprint": FP}, changed)
    message = str(info.value)
    assert "dataset changed (sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb)" in message
    assert "batch size changed 2 -> 4" in message and "seed changed 1 -> 2" in message
    assert "learning rate" not in message and "--output" in message
    for key, value in [("grad_accum", 1), ("model", "/other"), ("bits", 8), ("rank", 16),
                       ("target_modules", "q_proj"), ("max_seq_len", 128), ("packing", True), ("num_processes", 2)]:
        with pytest.raises(CheckpointError):
            check_resume_compatible(FP, {**FP, key: value})
    warned = check_resume_compatible(FP, {**FP, "lr": 1e-4, "max_steps": 20, "save_steps": 5, "logging_steps": 3})
    assert len(warned) == 4 and any("learning rate changed 0.0002 -> 0.0001" in w for w in warned)


def test_make_fingerprint_reads_nested_config():
    from qlora_lite.config import Config

    config = Config()
    config.model.model, config.train.batch_size = "/m", 3
    fp = make_fingerprint(config.to_dict(), "c" * 64, num_processes=1)
    assert fp["batch_size"] == 3 and fp["model"] == "/m" and fp["dataset_sha256"] == "c" * 64
    assert {"seed", "grad_accum", "rank", "target_modules", "max_seq_len", "packing", "lr"} <= set(fp)


def test_guard_output_dir(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    for bad in (model_dir, model_dir / "out"):
        with pytest.raises(CheckpointError, match="inside the model folder"):
            guard_output_dir(bad, model_dir, resume=False)
    guard_output_dir(tmp_path / "new", model_dir, resume=False)  # does not exist yet: fine
    user = tmp_path / "user"
    user.mkdir()
    guard_output_dir(user, model_dir, resume=False)  # empty: fine
    (user / "thesis.docx").write_text("precious")
    with pytest.raises(CheckpointError, match="thesis.docx"):
        guard_output_dir(user, model_dir, resume=True)
    assert (user / "thesis.docx").read_text() == "precious"
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(CheckpointError, match="no .qlora-lite-run marker"):  # names alone do not make a run
        guard_output_dir(run, model_dir, resume=True)
    mark_run(run)
    with pytest.raises(CheckpointError, match="--resume"):
        guard_output_dir(run, model_dir, resume=False)
    guard_output_dir(run, model_dir, resume=True)
    guard_output_dir(run, "some/hub-id", resume=True)  # a hub id is not a folder: nothing to compare


def _calls(source: str, name: str):
    """The full text of every ``name(...)`` call in source (balanced parentheses)."""
    for match in re.finditer(re.escape(name) + r"\s*\(", source):
        depth, i = 0, match.end() - 1
        for i in range(match.end() - 1, len(source)):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            if depth == 0:
                break
        yield source[match.start(): i + 1]


def test_package_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "checkpoint" / "folder.py" in files
    problems = []
    for file in files:
        source = file.read_text()
        for needle in ("pickle.load", "pickle.Unpickler", "allow_pickle=True", "import dill", "joblib.load"):
            if needle in source:
                problems.append(f"{file.name}: {needle}")
        problems += [f"{file.name}: {call}" for call in _calls(source, "torch.load")
                     if not re.search(r"weights_only\s*=\s*True", call)]
    assert problems == []


def test_paged_state_loads_into_plain_twin_but_not_other_optimizer(tmp_path, tiny_llama):
    """A checkpoint from a GPU run (paged optimizer) resumes on a CPU (plain twin); AdamW state does not
    silently load into an 8-bit optimizer."""
    model = _model(tiny_llama)
    params, step = _fixed_gradient_steps(model)
    paged = bnb.optim.PagedAdamW8bit(params, lr=1e-3, min_8bit_size=1)
    step(paged)
    path = save_checkpoint(tmp_path, 1, model, paged, None, {"step": 1, "fingerprint": {"seed": 5}})
    step(paged)
    expected = [p.detach().clone() for p in params]
    plain = bnb.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=1)
    load_checkpoint(path, model, plain)
    step(plain)
    assert all(torch.equal(p, e) for p, e in zip(params, expected))
    with pytest.raises(CheckpointError, match=r"optimizer\.json: state of PagedAdamW8bit, but the run uses AdamW;"):
        load_checkpoint(path, model, torch.optim.AdamW(params))
    assert read_trainer_state(path)["fingerprint"] == {"seed": 5}
