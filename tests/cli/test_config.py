"""The config tree: YAML + flag overrides, coercion, one error listing every problem."""

from pathlib import Path

import pytest

from qlora_lite.config import Config, load_config, reference_markdown
from qlora_lite.errors import ConfigError


def test_yaml_sections_then_flag_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  model: some/model\n  bits: 8\nlora:\n  rank: 4\n  target_modules: [q_proj, v_proj]\n"
                    "train:\n  lr: 2e-4\n  gradient_checkpointing: false\n")
    config = load_config(path, {"rank": 8, "lr": None})
    assert config.model.bits == 8 and config.lora.rank == 8  # the flag wins, None means "not given"
    assert config.lora.target_modules == "q_proj,v_proj"
    assert config.train.lr == pytest.approx(2e-4) and config.train.gradient_checkpointing is False


def test_flat_yaml_and_saved_config_round_trip(tmp_path):
    config = load_config(None, {"model": "m", "data": "d.jsonl", "output": "o", "epochs": 2})
    config.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config


def test_relative_input_paths_in_a_yaml_file_are_read_beside_it(tmp_path, monkeypatch):
    folder, elsewhere = tmp_path / "cfg", tmp_path / "elsewhere"
    for d in (folder / "model", elsewhere):
        d.mkdir(parents=True)
    (folder / "train.jsonl").write_text("{}\n")
    (elsewhere / "held.jsonl").write_text("{}\n")
    (folder / "run.yaml").write_text("model: model\ndata: train.jsonl\neval_data: held.jsonl\n"
                                     "adapter: org/name\noutput: runs/x\n")
    monkeypatch.chdir(elsewhere)
    config = load_config(folder / "run.yaml")
    assert Path(config.model.model) == folder / "model" and Path(config.data.data) == folder / "train.jsonl"
    assert config.data.eval_data == "held.jsonl"  # found only here: relative to the current folder, as before
    assert config.lora.adapter == "org/name" and config.train.output == "runs/x"  # no such file; output: here
    # flags are relative to the current folder, and a config in the current folder reads as it always did
    assert load_config(folder / "run.yaml", {"data": "train.jsonl"}).data.data == "train.jsonl"
    monkeypatch.chdir(folder)
    assert load_config("run.yaml").data.data == "train.jsonl"


def test_every_problem_reported_at_once():
    config = load_config(None, {"bits": 3, "rank": 0, "dropout": 1.5, "lr_scheduler": "step"})
    with pytest.raises(ConfigError) as info:
        config.validate(required=("model.model", "data.data"))
    message = str(info.value)
    for expected in ("--model is required", "--data is required", "--bits=3", "--rank", "--dropout", "--lr-scheduler"):
        assert expected in message


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  bits: 4\n  rank: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(path)
    path.write_text("ranks: 4\n")
    with pytest.raises(ConfigError, match="unknown setting.*ranks"):
        load_config(path)
    path.write_text("rank: four\n")
    with pytest.raises(ConfigError, match="--rank: expected int"):
        load_config(path)


def test_reference_lists_every_field():
    text = reference_markdown()
    import dataclasses

    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            assert f"`--{f.name.replace('_', '-')}`" in text
