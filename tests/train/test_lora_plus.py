"""LoRA+ (--lora-plus-ratio): the B matrices train at R times the learning rate of the A matrices, at
every step of the schedule, in every optimizer, and a resume keeps the ratio or refuses a new one."""

from __future__ import annotations

import pytest
import torch
from tiny_models import write_chat_jsonl

from qlora_lite.config import load_config
from qlora_lite.errors import CheckpointError, ConfigError
from qlora_lite.train.loop import train
from qlora_lite.train.optim import build_optimizer, build_scheduler, lora_plus_groups


def _named():
    torch.manual_seed(0)
    return [(f"layers.{i}.q_proj.lora_{ab}.weight", torch.nn.Parameter(torch.randn(4, 8)))
            for i in range(2) for ab in "AB"]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_b_learns_at_r_times_the_rate_of_a_through_the_whole_schedule(optimizer):
    named = _named()
    opt = build_optimizer(lora_plus_groups(named, 16.0), optimizer, lr=1e-3)
    scheduler = build_scheduler(opt, "cosine", 2, 10)
    a_group, b_group = opt.param_groups
    assert {id(p) for p in a_group["params"]} == {id(p) for n, p in named if "lora_A" in n}
    assert {id(p) for p in b_group["params"]} == {id(p) for n, p in named if "lora_B" in n}
    for _ in range(6):
        for _, p in named:
            p.grad = torch.ones_like(p)
        opt.step()
        scheduler.step()
        assert b_group["lr"] == pytest.approx(16.0 * a_group["lr"]) and a_group["lr"] > 0


def test_ratio_one_is_plain_lora_with_one_group():
    opt = build_optimizer(lora_plus_groups(_named(), 1.0), "adamw", lr=1e-3)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 1e-3


def test_ratio_must_be_positive():
    with pytest.raises(ConfigError, match="--lora-plus-ratio must be positive"):
        load_config(None, {"model": "m", "data": "d", "lora_plus_ratio": 0}).validate()


def test_a_resumed_run_keeps_the_ratio_and_refuses_another(tiny_llama, tmp_path, one_thread, ctrl_c_after):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=8)

    def config(**changes):
        values = dict(model=str(tiny_llama), data=str(data), output=str(tmp_path / "run"), bits=16, rank=4,
                      max_seq_len=64, batch_size=2, max_steps=4, save_steps=2, optimizer="adamw", lr=1e-3,
                      lora_plus_ratio=8.0, lr_scheduler="constant")
        return load_config(None, {**values, **changes})

    with ctrl_c_after(2), pytest.raises(KeyboardInterrupt):
        train(config())
    with pytest.raises(CheckpointError, match="LoRA\\+ ratio changed 8.0 -> 4.0"):
        train(config(resume=True, lora_plus_ratio=4.0))
    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(torch.optim.AdamW, "step", recording_step)
        train(config(resume=True))
    assert seen and all(lrs == pytest.approx([1e-3, 8e-3]) for lrs in seen)
