"""Output-folder ownership and the run lock: a run touches only what it wrote, one run per folder."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner
from tiny_models import write_chat_jsonl

from qlora_lite.checkpoint.folder import rotate_checkpoints
from qlora_lite.checkpoint.resume import guard_output_dir
from qlora_lite.checkpoint.run_folder import LOCK_NAME, RunLock, mark_run
from qlora_lite.cli import main
from qlora_lite.errors import CheckpointError
from qlora_lite.storage.output_dir import PROBE_PREFIX


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _foreign_checkpoint(folder):
    """What another trainer (transformers' Trainer) leaves: pickled state our checkpoints never hold."""
    ckpt = folder / "checkpoint-500"
    ckpt.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
        (ckpt / name).write_bytes(b"theirs")
    return ckpt


def test_another_trainers_checkpoint_is_not_a_run_and_survives_rotation(tmp_path):
    out = tmp_path / "out"
    ckpt = _foreign_checkpoint(out)
    with pytest.raises(CheckpointError, match="checkpoint-500/.*no .qlora-lite-run marker"):
        guard_output_dir(out, None, resume=True)
    mark_run(out)
    with pytest.raises(CheckpointError, match="checkpoint-500/"):  # a marker does not make it ours
        guard_output_dir(out, None, resume=True)
    assert rotate_checkpoints(out, total_limit=1) == []
    assert (ckpt / "optimizer.pt").read_bytes() == b"theirs"


def test_a_killed_write_of_ours_is_still_cleaned_up(tmp_path):
    half = tmp_path / "checkpoint-3"
    half.mkdir()
    (half / "optimizer.json").write_text("{")
    assert rotate_checkpoints(tmp_path, total_limit=1) == [half] and not half.exists()


def test_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from qlora_lite.checkpoint.run_folder import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"in use by another qlora-lite train \(pid {holder.pid}\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    RunLock(tmp_path).acquire().release()
    assert (tmp_path / LOCK_NAME).exists()


@pytest.fixture(scope="module")
def finished_run(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("owned")
    data, out = write_chat_jsonl(root / "train.jsonl", n=8), root / "run"
    args = ["train", "--model", tiny_llama, "--data", data, "--output", out, "--bits", 16, "--rank", 2,
            "--max-seq-len", 64, "--batch-size", 4, "--max-steps", 1, "--optimizer", "adamw"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return args, out


def test_second_train_on_a_locked_folder_is_refused(finished_run, one_thread):
    args, out = finished_run
    lock = RunLock(out).acquire()  # as a live run holds it
    try:
        result = invoke(*args, "--resume", "--max-steps", 2)
    finally:
        lock.release()
    assert result.exit_code != 0 and "in use by another qlora-lite train" in result.output


def test_resume_never_replaces_the_starting_adapter_or_the_users_yaml(finished_run, one_thread):
    args, out = finished_run
    adapter = (out / "adapter_model.safetensors").read_bytes()
    result = invoke(*args, "--resume", "--max-steps", 2, "--adapter", out)
    assert result.exit_code != 0 and "replace the adapter it starts from" in result.output
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    yaml_file = out / "config.yaml"
    mine = "# my notes on this run\n" + yaml_file.read_text()
    yaml_file.write_text(mine)
    result = invoke(*args, "--resume", "--max-steps", 2, "--config", yaml_file)
    assert result.exit_code != 0 and "config.yaml (changed since qlora-lite wrote it)" in result.output
    assert yaml_file.read_text() == mine


def test_another_process_probing_the_output_is_not_a_foreign_file(tmp_path):
    """With several processes, one may see the write probe another creates for an instant; the guard
    must not call the folder someone else's for it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / f"{PROBE_PREFIX}12345").touch()
    guard_output_dir(out, None, resume=False)  # an empty folder, as far as runs go
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        guard_output_dir(out, None, resume=False)
