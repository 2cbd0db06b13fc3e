"""What the user sees when something is wrong: one ``Error: ...`` line naming the file or option and
what to do, exit status 1 (2 for a bad flag), no traceback, and nothing the user had is lost.

Every command runs in-process through click with ``catch_exceptions=False``, so an exception that
escapes the CLI fails the test instead of being turned into a silent exit code. Tests that must
fail before the model loads replace the loader with one that fails the test when called.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny_models import write_chat_jsonl

from qlora_lite.cli import main
from qlora_lite.errors import QloraLiteError


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def clean_error(result, code: int = 1) -> str:
    """The output of a command that failed as a user error: the exit code, one Error line, no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.output.count("Error:") == 1, result.output
    return result.output


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load model weights fails the test: the error had to come before it."""
    from qlora_lite.model import build

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the problem was reported")

    monkeypatch.setattr(build, "load_base_model", loaded)


@pytest.fixture
def model_copy(tiny_llama, tmp_path):
    return shutil.copytree(tiny_llama, tmp_path / "model")


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """A 16-bit run of two steps with a checkpoint each step: (run folder, its data file)."""
    folder = tmp_path_factory.mktemp("trained")
    data = write_chat_jsonl(folder / "train.jsonl", n=8)
    run = folder / "run"
    result = invoke("train", "--model", tiny_llama, "--data", data, "--output", run, "--bits", 16, "--rank", 4,
                    "--max-seq-len", 64, "--batch-size", 4, "--max-steps", 2, "--save-steps", 1)
    assert result.exit_code == 0, result.output
    return run, data


@pytest.fixture
def adapter_copy(trained, tmp_path):
    run, _ = trained
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "qlora_lite.json"):
        shutil.copy2(run / name, folder / name)
    return folder


def train_args(model, data, out, *extra):
    return ("train", "--model", model, "--data", data, "--output", out, "--bits", 16, "--rank", 4,
            "--max-seq-len", 64, "--batch-size", 4, *extra)


# ---------------------------------------------------------------- one base class, one handler


ERROR_CLASSES = [
    ("qlora_lite.errors", "AdapterError", ValueError), ("qlora_lite.errors", "CheckpointError", RuntimeError),
    ("qlora_lite.errors", "ConfigError", ValueError), ("qlora_lite.errors", "DataError", ValueError),
    ("qlora_lite.errors", "DemoError", RuntimeError), ("qlora_lite.errors", "LaunchError", RuntimeError),
    ("qlora_lite.errors", "MergeError", RuntimeError), ("qlora_lite.errors", "GGUFExportError", ValueError),
    ("qlora_lite.errors", "LoRATargetError", ValueError), ("qlora_lite.errors", "EstimateError", ValueError),
    ("qlora_lite.errors", "MetricsError", ValueError), ("qlora_lite.errors", "ModelLoadError", RuntimeError),
    ("qlora_lite.errors", "SafetensorsError", ValueError),
    ("qlora_lite.errors", "ScalerStateError", ValueError), ("qlora_lite.errors", "TrainingError", RuntimeError),
    ("qlora_lite.errors", "OutputError", OSError),
]


@pytest.mark.parametrize(("module", "name", "builtin"), ERROR_CLASSES)
def test_every_user_error_shares_the_base_and_keeps_its_builtin_base(module, name, builtin):
    import importlib

    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, QloraLiteError) and issubclass(cls, builtin)


def test_a_new_error_class_raised_in_any_command_reaches_the_user_as_a_message(tmp_path, monkeypatch):
    from qlora_lite.train import metrics as plot

    class BrandNewError(QloraLiteError):
        """No command knows this class: the group alone must turn it into a message."""

    def fail(*args, **kwargs):
        raise BrandNewError("metrics.jsonl: something new went wrong; do this instead")

    monkeypatch.setattr(plot, "plot_loss", fail)
    output = clean_error(invoke("plot", tmp_path))
    assert output == "Error: metrics.jsonl: something new went wrong; do this instead\n"


@pytest.mark.parametrize(("args", "shown"), [(["--help"], "export-gguf"), (["estimate", "--model", "demo"], "total")])
def test_help_and_estimate_import_no_torch(args, shown):
    """``--help`` and ``estimate`` answer in a moment: neither imports torch."""
    code = f"import sys; from qlora_lite.cli import main; main({args!r}, standalone_mode=False); " \
           "sys.exit('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0, run.stderr
    assert shown in run.stdout


# ---------------------------------------------------------------- damaged model folders (item 11)


def _random_bytes(folder):
    (folder / "model.safetensors").write_bytes(os.urandom(4096))


def _malformed_header(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"{{x:"  # the JSON header starts at byte 8
    path.write_bytes(bytes(data))


def _truncated_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _config_json(folder):
    (folder / "config.json").write_text('{"model_type": "llama",\n "hidden_size": 64,,\n}')


def _tokenizer_json(folder):
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')


def _tokenizer_structure(folder):
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')  # valid JSON, no tokenizer


def _tokenizer_specials(folder):
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')


def _vision_model(folder):
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="vit", architectures=None)
    (folder / "config.json").write_text(json.dumps(config))


def _remote_code(folder):
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_custom_lm", auto_map={"AutoConfig": "configuration.MyConfig",
                                                        "AutoModelForCausalLM": "modeling.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))


DAMAGES = [
    (_random_bytes, ["model.safetensors", "not a safetensors file", "copy or download"]),
    (_malformed_header, ["model.safetensors", "damaged safetensors header", "copy or download"]),
    (_truncated_weights, ["model.safetensors", "truncated", "copy or download"]),
    (_config_json, ["config.json:2:", "not valid JSON", "copy it from the original"]),
    (_tokenizer_json, ["tokenizer.json:1:", "not valid JSON", "copy it from the original"]),
    (_tokenizer_structure, ["the tokenizer cannot be loaded", "copy the tokenizer files"]),
    (_tokenizer_specials, ["no pad, EOS or unknown token", "copy the tokenizer files"]),
    (_vision_model, ["config.json", "vit is not a causal language model", "Llama, Mistral"]),
    (_remote_code, ["config.json", "my_custom_lm", "--trust-remote-code"]),
]


@pytest.mark.parametrize(("damage", "expected"), DAMAGES, ids=[d.__name__.strip("_") for d, _ in DAMAGES])
def test_damaged_model_folder_is_named_before_loading(model_copy, tmp_path, damage, expected, monkeypatch):
    from qlora_lite.model import loading as quant

    damage(model_copy)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the problem was reported")

    monkeypatch.setattr(quant, "iter_checkpoint_tensors", no_weights)
    data = write_chat_jsonl(tmp_path / "eval.jsonl", n=2)
    output = clean_error(invoke("eval", "--model", model_copy, "--data", data, "--no-exact-match"))
    for part in expected:
        assert part in output
    assert len(output.splitlines()) <= 3  # not transformers' list of ~200 config classes
    assert "Config," not in output


def test_pickle_bin_that_runs_code_is_refused_without_the_weights_only_false_advice(model_copy, tmp_path):
    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": RunsCode()}))
    data = write_chat_jsonl(tmp_path / "eval.jsonl", n=2)
    output = clean_error(invoke("eval", "--model", model_copy, "--data", data, "--no-exact-match",
                                "--allow-bin-weights"))
    assert "pytorch_model.bin" in output and "refused" in output and "safetensors" in output
    assert "weights_only=False" not in output.replace(" ", "") and "weights_only" not in output
    assert not marker.exists()


# ---------------------------------------------------------------- outputs (item 11)


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: creating files in ``folder`` fails as on a read-only mount (root ignores
    permission bits, so chmod cannot show it)."""
    real_open = os.open

    def install(folder):
        def guarded(path, flags, *args, **kwargs):
            if os.path.dirname(os.path.abspath(path)) == str(folder) and flags & os.O_CREAT:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", guarded)

    return install


def test_train_into_read_only_folder_fails_before_loading(tiny_llama, tmp_path, read_only, no_model_load):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=8)
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro")
    output = clean_error(invoke(*train_args(tiny_llama, data, tmp_path / "ro" / "run", "--max-steps", 1)))
    assert "--output" in output and "Read-only file system" in output and "choose a folder you can write" in output


def test_demo_into_read_only_folder_is_a_message(tmp_path, read_only, no_model_load):
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro")
    output = clean_error(invoke("demo", "--output", tmp_path / "ro" / "demo", "--max-steps", 1, "--no-gguf"))
    assert "--output" in output and "Read-only file system" in output


def test_merge_into_read_only_folder_fails_before_loading(tiny_llama, adapter_copy, tmp_path, read_only, monkeypatch):
    from qlora_lite.merge import write as export

    def planned(*args, **kwargs):
        raise AssertionError("the merge started before the output was checked")

    monkeypatch.setattr(export, "plan_merge", planned)
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro")
    output = clean_error(invoke("merge", "--model", tiny_llama, "--adapter", adapter_copy,
                                "--output", tmp_path / "ro" / "merged", "--quiet"))
    assert "Read-only file system" in output


def test_disk_full_at_the_final_adapter_save_keeps_the_checkpoints_and_resume_finishes(
        tiny_llama, tmp_path, monkeypatch):

    from qlora_lite.checkpoint.folder import COMPLETE_MARKER

    data = write_chat_jsonl(tmp_path / "train.jsonl", n=8)
    run = tmp_path / "run"
    from qlora_lite.storage import durable

    real_save = durable.save_file

    def full_disk(tensors, filename, metadata=None):
        if os.path.dirname(filename) == str(run):  # the adapter at the top of the run, not a checkpoint
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(durable, "save_file", full_disk)
    args = train_args(tiny_llama, data, run, "--max-steps", 2, "--save-steps", 1)
    output = clean_error(invoke(*args))
    assert "No space left on device" in output.replace("no space", "No space")
    assert "free some disk space" in output and str(run / "checkpoint-2") in output and "--resume" in output
    assert not list(run.glob("*.tmp")) and not (run / "adapter_model.safetensors").exists()
    assert all((run / f"checkpoint-{s}" / COMPLETE_MARKER).is_file() for s in (1, 2))

    monkeypatch.setattr(durable, "save_file", real_save)  # space freed: the advice works
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    saved = load_file(run / "adapter_model.safetensors")
    checkpoint = load_file(run / "checkpoint-2" / "adapter_model.safetensors")
    assert saved.keys() == checkpoint.keys() and all(torch.equal(saved[k], checkpoint[k]) for k in saved)


def test_disk_full_in_merge_removes_partial_files_and_keeps_the_old_output(
        tiny_llama, adapter_copy, tmp_path, monkeypatch):
    from qlora_lite.merge import write as export

    def full_disk(folder, *args, **kwargs):
        (folder / "model-00001-of-00001.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "model-00001-of-00001.safetensors"))

    monkeypatch.setattr(export, "write_sharded", full_disk)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "mine.txt").write_text("the user's earlier merge")
    output = clean_error(invoke("merge", "--model", tiny_llama, "--adapter", adapter_copy, "--output", merged,
                                "--overwrite", "--quiet", "--no-verify"))
    assert "no space left on device" in output and "free some disk space" in output and "left as it was" in output
    assert [p.name for p in tmp_path.iterdir() if "merged" in p.name] == ["merged"]  # no .partial folder
    assert [p.name for p in merged.iterdir()] == ["mine.txt"]


def test_disk_full_in_gguf_export_removes_the_partial_file_and_keeps_the_old_one(tiny_llama, tmp_path, monkeypatch):
    from qlora_lite.gguf import writer as gguf_export

    def full_disk(tmp, *args, **kwargs):
        tmp.write_bytes(b"GGUF partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    monkeypatch.setattr(gguf_export, "_write", full_disk)
    target = tmp_path / "model.gguf"
    target.write_bytes(b"the user's earlier export")
    output = clean_error(invoke("export-gguf", "--model", tiny_llama, "--output", target, "--overwrite", "--quiet"))
    assert f"writing {target} failed: no space left on device: free some disk space" in output
    assert "left as it was" in output
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"] and target.read_bytes() == b"the user's earlier export"


# ---------------------------------------------------------------- numbers (items 11 and 12)


@pytest.mark.parametrize(("flags", "message"), [
    (("--weight-decay", "-5"), "--weight-decay must be 0 or more"),
    (("--weight-decay", "nan"), "--weight-decay must be a finite number, got nan"),
    (("--epochs", "inf"), "--epochs must be a finite number, got inf"),
    (("--lr", "inf"), "--lr must be a finite number"),
])
def test_non_finite_or_out_of_range_numbers_are_refused_before_loading(tiny_llama, tmp_path, no_model_load, flags,
                                                                         message):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=8)
    output = clean_error(invoke(*train_args(tiny_llama, data, tmp_path / "run", *flags)))
    assert message in output
    assert not (tmp_path / "run").exists()


def test_yaml_rank_true_is_refused_with_file_and_line(tiny_llama, tmp_path, no_model_load):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=8)
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  model: {tiny_llama}\nlora:\n  rank: true\n")
    output = clean_error(invoke("train", "--config", config, "--data", data, "--output", tmp_path / "run"))
    assert f"{config}:4: --rank: expected int, got True" in output


@pytest.mark.parametrize(("flags", "message"), [
    (("--temperature", "nan"), "finite --temperature"),
    (("--max-new-tokens", "100000"), "--max-new-tokens 100000 does not fit the model's context of 256"),
])
def test_generate_refuses_nan_temperature_and_replies_past_the_context(tiny_llama, no_model_load, flags, message):
    output = clean_error(invoke("generate", "--model", tiny_llama, "--prompt", "hello", *flags), code=2)
    assert message in output


# ---------------------------------------------------------------- silent acceptance (item 12)


def test_typo_in_a_target_modules_list_is_refused_with_a_suggestion(tiny_llama, tmp_path):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=8)
    output = clean_error(invoke(*train_args(tiny_llama, data, tmp_path / "run", "--max-steps", 1,
                                            "--target-modules", "q_proj,v_prj")))
    assert "'v_prj'" in output and "did you mean 'v_proj'" in output
    assert not (tmp_path / "run").exists()


def test_unknown_chat_role_is_refused_with_file_and_line(tiny_llama, tmp_path, no_model_load):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=8)
    with open(data, "a") as f:
        f.write(json.dumps({"messages": [{"role": "usr", "content": "add 1 and 2"},
                                         {"role": "assistant", "content": "1 plus 2 equals 3"}]}) + "\n")
    output = clean_error(invoke(*train_args(tiny_llama, data, tmp_path / "run", "--max-steps", 1)))
    assert f"{data}:9:" in output and "'usr'" in output and "system, user, assistant" in output


def test_nan_adapter_weights_are_refused_instead_of_scoring_nan(tiny_llama, adapter_copy, tmp_path):
    path = adapter_copy / "adapter_model.safetensors"
    tensors = load_file(path)
    name = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    data = write_chat_jsonl(tmp_path / "eval.jsonl", n=2)
    output = clean_error(invoke("eval", "--model", tiny_llama, "--adapter", adapter_copy, "--data", data,
                                "--no-exact-match"))
    assert "adapter_model.safetensors" in output and "NaN or infinite" in output and "checkpoint" in output


def test_adapter_config_r_disagreeing_with_its_tensors_is_refused(tiny_llama, adapter_copy, tmp_path):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    config["r"] = 8  # the tensors have rank 4
    (adapter_copy / "adapter_config.json").write_text(json.dumps(config))
    data = write_chat_jsonl(tmp_path / "eval.jsonl", n=2)
    output = clean_error(invoke("eval", "--model", tiny_llama, "--adapter", adapter_copy, "--data", data,
                                "--no-exact-match"))
    assert "adapter_config.json: r is 8" in output and "rank 4" in output


def test_damaged_qlora_lite_json_is_named(tiny_llama, adapter_copy, tmp_path):
    (adapter_copy / "qlora_lite.json").write_text('{"bits": 4,')
    data = write_chat_jsonl(tmp_path / "eval.jsonl", n=2)
    output = clean_error(invoke("eval", "--model", tiny_llama, "--adapter", adapter_copy, "--data", data,
                                "--no-exact-match"))
    assert "qlora_lite.json:1:" in output and "not valid JSON" in output


def test_divergence_message_keeps_the_case_of_the_checkpoint_path(tiny_llama, tmp_path, monkeypatch):
    from qlora_lite.train import loop as train_module

    real, calls = train_module.batch_loss_sum, []

    def poisoned(model, batch):
        loss, n = real(model, batch)
        calls.append(1)
        return (loss * float("nan"), n) if len(calls) == 3 else (loss, n)  # one micro-batch per step: step 3

    monkeypatch.setattr(train_module, "batch_loss_sum", poisoned)
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=8)
    run = tmp_path / "Runs" / "MyRun"
    output = clean_error(invoke(*train_args(tiny_llama, data, run, "--max-steps", 4, "--save-steps", 1)))
    assert f"The last good checkpoint is {run / 'checkpoint-2'}" in output
