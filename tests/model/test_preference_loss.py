"""The pieces under the preference losses: the adapter switch, per-token chunked loss, pair batches."""

from __future__ import annotations

import torch

from qlora_lite.kernels.chunked_loss import causal_lm_loss
from qlora_lite.model.build import build_model
from qlora_lite.model.lora import adapters_disabled, lora_dropout_off, lora_layers
from qlora_lite.model.preference import PreferenceLoss, collate_pairs


def test_adapters_disabled_is_the_base_and_switches_back(tiny_llama):
    from tiny_models import probe

    model = build_model(str(tiny_llama), bits=4, rank=4, dropout=0.0, trainable=True, gradient_checkpointing=False,
                        seed=0)
    base = build_model(str(tiny_llama), bits=4, rank=4, dropout=0.0, trainable=True, gradient_checkpointing=False,
                       seed=0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    ids = probe()
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with adapters_disabled(model):
            off = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
        plain = base(input_ids=ids).logits  # B = 0: the base's logits
    assert torch.equal(off, plain) and torch.equal(again, tuned) and not torch.allclose(tuned, plain)


def test_lora_dropout_off_only_touches_the_adapter_dropout(tiny_llama):
    model = build_model(str(tiny_llama), bits=16, rank=4, dropout=0.5, trainable=True, gradient_checkpointing=False)
    with lora_dropout_off(model):
        assert model.training and all(not m.lora_dropout.training for m in lora_layers(model).values())
    assert all(m.lora_dropout.training for m in lora_layers(model).values())


def test_per_token_chunked_loss_and_its_gradient_match_the_summed_one(tiny_llama):
    model = build_model(str(tiny_llama), bits=16, compute_dtype="fp32", lora_dtype="fp32", rank=4, dropout=0.0,
                        trainable=True, gradient_checkpointing=False, seed=0)
    ids = torch.randint(3, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :7] = -100
    labels[2, 15:] = -100
    weights = torch.tensor([0.5, -1.0, 2.0])
    per_token = causal_lm_loss(model, ids, labels, reduction="none")  # (3, 19)
    assert per_token.shape == (3, 19) and bool((per_token[:, :6] == 0).all())
    (per_token.sum(1) * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    # the same weighted sum as three summed losses, one per row
    sum(w * causal_lm_loss(model, ids[i:i + 1], labels[i:i + 1], reduction="sum") for i, w in enumerate(weights)).backward()
    for g, p in zip(grads, (p for p in model.parameters() if p.requires_grad)):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)


def test_pairs_batch_chosen_rows_first_and_ipo_prefers_a_margin_of_half_over_beta():
    pairs = [{"chosen_input_ids": [1, 5, 6], "chosen_labels": [-100, 5, 6],
              "rejected_input_ids": [1, 7], "rejected_labels": [-100, 7]}] * 2
    batch = collate_pairs(pairs, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 5, 6], [1, 7, 0], [1, 7, 0]]
    ipo = PreferenceLoss("dpo", beta=0.5, loss_type="ipo")
    n = torch.tensor([2.0, 2.0, 1.0, 1.0])
    ref = torch.zeros(4)
    at_target = ipo.pair_terms(torch.tensor([2.0, 2.0, 0.0, 0.0]), n, ref)["losses"]  # per-token gap 1 = 1/(2 beta)
    off_target = ipo.pair_terms(torch.tensor([4.0, 4.0, 0.0, 0.0]), n, ref)["losses"]
    assert torch.equal(at_target, torch.zeros(2)) and bool((off_target > 0).all())
