"""Our DPO, IPO and ORPO losses and adapter gradients equal TRL's (trl, like peft, is a test-only
dependency) on a tiny fp32 model and a fixed batch of pairs.

TRL runs its own trainer code on a PEFT model holding the same adapter: ``DPOTrainer._compute_loss``
(the reference: the same model with the adapter disabled) and ORPOTrainer's
``get_batch_loss_metrics``. Ours: ``model.preference`` through the chunked loss kernel.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import write_preference_jsonl

from qlora_lite.data.preference import load_preference_dataset
from qlora_lite.model.adapter import save_adapter
from qlora_lite.model.build import build_model
from qlora_lite.model.folder import load_tokenizer
from qlora_lite.model.lora import lora_layers
from qlora_lite.model.preference import (
    PreferenceLoss,
    chosen_tokens,
    collate_pairs,
    pair_reference,
    reference_logps,
    sequence_logps,
)

trl = pytest.importorskip("trl")
TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    """Our fp32 model with a random adapter, PEFT's copy of it, and a batch of 4 pairs (prompts of
    different lengths, so padding and the prompt mask both matter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("parity")
    ours = build_model(str(tiny_llama), bits=16, compute_dtype="fp32", lora_dtype="fp32", rank=4, alpha=8,
                       dropout=0.0, trainable=True, gradient_checkpointing=False, seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a trained-looking adapter: the policy differs from the reference
        for layer in lora_layers(ours).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
    save_adapter(ours, tmp / "adapter")
    tokenizer = load_tokenizer(tiny_llama)
    data = write_preference_jsonl(tmp / "pairs.jsonl", n=4, seed=3)
    pairs, _ = load_preference_dataset(data, tokenizer, max_seq_len=64)

    def theirs():
        """A fresh base, handed to TRL with the adapter to train (TRL takes the base with the adapter
        disabled as the reference only for an adapter it adds itself: a PeftModel given to it is a
        retrained one, whose start is copied as the reference), then given our adapter's values."""
        from peft import LoraConfig

        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                           tmp / "adapter")
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
        values = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
        return base, config, values

    return ours, theirs, tokenizer, pairs, tmp


def _our_loss(model, pairs, objective, pad_token_id):
    batch = collate_pairs(pairs, pad_token_id)
    logps, n_tokens = sequence_logps(model, batch)
    terms = objective.pair_terms(logps, n_tokens, pair_reference(model, batch, pairs, objective))
    return terms["losses"].mean() + terms["nll_sum"] / chosen_tokens(pairs), terms


def _grads(named_params) -> dict[str, torch.Tensor]:
    """``{module path .lora_A/.lora_B: grad}`` with PEFT's ``base_model.model.`` prefix and adapter name removed."""
    out = {}
    for name, p in named_params:
        if "lora_" in name and p.grad is not None:
            key = name.replace("base_model.model.", "").replace(".default", "")
            out[key] = p.grad.detach().clone()
    return out


def _zero(model):
    for p in model.parameters():
        p.grad = None


def _trl_trainer(cls, args, theirs, tokenizer):
    """A TRL trainer around a fresh base plus TRL's own LoRA adapter, set to our adapter's values."""
    from datasets import Dataset

    base, peft_config, values = theirs()
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]  # the trainer needs a dataset; the batch is ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=peft_config)
    state = trainer.model.state_dict()
    with torch.no_grad():
        for key, value in values.items():
            state[key].copy_(value)
    trainer.model.train()
    return trainer


def _args(cls, tmp, **kwargs):
    with warnings.catch_warnings():  # transformers' own deprecations inside TRL's config
        warnings.simplefilter("ignore")
        return cls(output_dir=str(tmp / "trl"), report_to=[], per_device_train_batch_size=4, use_cpu=True,
                   bf16=False, fp16=False, **kwargs)


def _dpo_trainer(theirs, tokenizer, tmp, **kwargs):
    return _trl_trainer(trl.DPOTrainer, _args(trl.DPOConfig, tmp, **kwargs), theirs, tokenizer)


def test_dpo_from_a_start_adapter_uses_it_as_reference_as_trl_does(setup, tiny_llama):
    """Retraining an adapter: TRL copies the start adapter as its reference ("ref"); we score the pairs
    once under the start adapter (``ref_logps``) before training moves it. After the same change to
    the trained adapter, loss and gradients agree."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours, _, tokenizer, pairs, tmp = setup
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    start = PeftModel.from_pretrained(base, tmp / "adapter", is_trainable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from datasets import Dataset

        trainer = trl.DPOTrainer(model=start, args=_args(trl.DPOConfig, tmp, beta=0.1),
                                 train_dataset=Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}]),
                                 processing_class=tokenizer)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with_ref = [{**pair, "ref_logps": [float(c), float(r)]} for pair, c, r in
                zip(pairs, *reference_logps(ours, batch, adapters=True).chunk(2))]
    g = torch.Generator().manual_seed(11)
    moves = {name: torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1
             for name, layer in lora_layers(ours).items()}
    state = trainer.model.state_dict()
    with torch.no_grad():
        for name, move in moves.items():
            lora_layers(ours)[name].lora_B.weight.add_(move)
            state[f"base_model.model.{name}.lora_B.default.weight"].add_(move)
    try:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "completion_mask": (batch["labels"] != -100).long()}
        trainer.model.train()
        _zero(trainer.model)
        trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        trl_loss.backward()
        _zero(ours)
        loss, terms = _our_loss(ours, with_ref, PreferenceLoss("dpo", beta=0.1), tokenizer.pad_token_id)
        loss.backward()
        assert abs(loss.item() - trl_loss.item()) < TOL
        assert float((terms["chosen_rewards"] - terms["rejected_rewards"]).abs().max()) > 1e-3
        trl_grads = {k: v for k, v in _grads(trainer.model.named_parameters()).items() if ".ref." not in k}
        for name, grad in _grads(ours.named_parameters()).items():
            torch.testing.assert_close(grad, trl_grads[name], atol=TOL, rtol=0)
    finally:
        with torch.no_grad():
            for name, move in moves.items():
                lora_layers(ours)[name].lora_B.weight.sub_(move)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_adapter_gradients_equal_trl(setup, loss_type):
    ours, theirs, tokenizer, pairs, tmp = setup
    trainer = _dpo_trainer(theirs, tokenizer, tmp, beta=0.1, loss_type=[loss_type])
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}
    _zero(trainer.model)
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    trl_loss.backward()
    trl_grads = _grads(trainer.model.named_parameters())

    _zero(ours)
    loss, terms = _our_loss(ours, pairs, PreferenceLoss("dpo", beta=0.1, loss_type=loss_type), tokenizer.pad_token_id)
    loss.backward()
    our_grads = _grads(ours.named_parameters())

    assert abs(loss.item() - trl_loss.item()) < TOL
    assert loss.item() > 0 and len(our_grads) == len(trl_grads) == 2 * len(lora_layers(ours))
    for name, grad in our_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, trl_grads[name], atol=TOL, rtol=0)
    margins = terms["chosen_rewards"] - terms["rejected_rewards"]
    assert float(margins.abs().max()) > 1e-3  # the adapter moved the policy: rewards are not all zero


def test_dpo_label_smoothing_is_conservative_dpo(setup):
    """TRL 1.x dropped label smoothing from its sigmoid loss; the conservative-DPO formula of TRL 0.x
    (``-(1-ls) logsigmoid(beta d) - ls logsigmoid(-beta d)``) is checked against TRL's own per-pair
    pieces: at ls=0 our loss is TRL's, and ls mixes it with the flipped-label loss."""
    ours, _, tokenizer, pairs, _ = setup
    plain, terms = _our_loss(ours, pairs, PreferenceLoss("dpo", beta=0.1), tokenizer.pad_token_id)
    smooth, _ = _our_loss(ours, pairs, PreferenceLoss("dpo", beta=0.1, label_smoothing=0.2), tokenizer.pad_token_id)
    d = (terms["chosen_rewards"] - terms["rejected_rewards"])  # beta * (chosen ratio - rejected ratio)
    flipped = -torch.nn.functional.logsigmoid(-d).mean()
    torch.testing.assert_close(smooth.detach(), 0.8 * plain.detach() + 0.2 * flipped, atol=1e-6, rtol=0)


def test_orpo_loss_and_adapter_gradients_equal_trl(setup):
    """TRL's ORPOTrainer counts the prompt tokens in its NLL (labels = input_ids); ours masks the prompt
    like our SFT loss. With a one-token prompt (never predicted: the loss is shifted) both count the
    same tokens, so loss and gradients must agree."""
    orpo = pytest.importorskip("trl.experimental.orpo")  # ORPO moved there in TRL 1.x
    ORPOConfig, ORPOTrainer = orpo.ORPOConfig, orpo.ORPOTrainer

    ours, theirs, tokenizer, pairs, tmp = setup
    short = [{"prompt_len": 1, **{f"{side}_{key}": [1] + pair[f"{side}_{key}"][pair["prompt_len"]:]
                                  for side in ("chosen", "rejected") for key in ("input_ids", "labels")}}
             for pair in pairs]
    for pair in short:
        pair["chosen_labels"][0] = pair["rejected_labels"][0] = -100
    args = _args(ORPOConfig, tmp, beta=0.25)
    trainer = _trl_trainer(ORPOTrainer, args, theirs, tokenizer)
    batch = {}
    for side in ("chosen", "rejected"):
        rows = collate_pairs(short, tokenizer.pad_token_id)
        half = slice(0, len(short)) if side == "chosen" else slice(len(short), None)
        batch[f"{side}_input_ids"] = rows["input_ids"][half]
        batch[f"{side}_attention_mask"] = rows["attention_mask"][half]
        batch[f"{side}_labels"] = rows["labels"][half]
    _zero(trainer.model)
    trl_loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    trl_loss.backward()
    trl_grads = _grads(trainer.model.named_parameters())

    _zero(ours)
    loss, terms = _our_loss(ours, short, PreferenceLoss("orpo", orpo_lambda=0.25), tokenizer.pad_token_id)
    loss.backward()
    our_grads = _grads(ours.named_parameters())

    assert abs(loss.item() - trl_loss.item()) < TOL
    assert abs(float(terms["chosen_rewards"].mean()) - metrics["rewards/chosen"]) < TOL
    assert len(our_grads) == len(trl_grads) == 2 * len(lora_layers(ours))
    for name, grad in our_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, trl_grads[name], atol=TOL, rtol=0)
