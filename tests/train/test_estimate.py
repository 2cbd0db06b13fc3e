"""The memory estimator: config.json in, a breakdown that adds up and moves the right way out."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qlora_lite.cli import main
from qlora_lite.errors import EstimateError
from qlora_lite.flag_values import parse_size
from qlora_lite.train.estimate import estimate_memory
from qlora_lite.train.fit import suggest_settings

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}
GPT2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}


@pytest.fixture
def llama_7b_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B))
    return tmp_path


def test_breakdown_sums_to_total():
    est = estimate_memory(LLAMA_7B)
    assert set(est.breakdown) == {"weights", "quant_constants", "lora", "optimizer", "activations", "logits", "runtime",
                                  "heap"}
    assert sum(est.breakdown.values()) == est.total
    assert all(v >= 0 for v in est.breakdown.values())


def test_llama_7b_numbers_in_known_range(llama_7b_dir):
    est = estimate_memory(llama_7b_dir, bits=4, double_quant=True)
    assert 6.6e9 < est.base_params < 6.8e9
    nf4 = est.breakdown["weights"] + est.breakdown["quant_constants"]
    assert 3.7e9 < nf4 < 4.1e9  # NF4+DQ 7B: ~3.9 GB (linear at 4.127 bits, embeddings and head in bf16)
    # r=16 on all seven projections of 32 blocks: 16 * (4*(4096+4096) + 3*(4096+11008)) * 32 = 40.0M
    assert est.lora_params == 16 * (4 * 8192 + 3 * (4096 + 11008)) * 32
    bf16 = estimate_memory(LLAMA_7B, bits=16)
    assert 13.0e9 < bf16.breakdown["weights"] < 13.8e9


def test_fewer_bits_use_less_memory():
    totals = [estimate_memory(LLAMA_7B, bits=b).total for b in (4, 8, 16)]
    assert totals[0] < totals[1] < totals[2]
    no_dq = estimate_memory(LLAMA_7B, double_quant=False)
    assert no_dq.breakdown["quant_constants"] > estimate_memory(LLAMA_7B).breakdown["quant_constants"]


def test_checkpointing_lowers_activations():
    on = estimate_memory(LLAMA_7B, gradient_checkpointing=True, seq_len=1024)
    off = estimate_memory(LLAMA_7B, gradient_checkpointing=False, seq_len=1024)
    assert on.breakdown["activations"] * 4 < off.breakdown["activations"]
    assert estimate_memory(LLAMA_7B, seq_len=2048).breakdown["activations"] > on.breakdown["activations"]


def test_optimizer_targets_chunked_loss_and_fsdp_move_the_right_parts():
    base = estimate_memory(LLAMA_7B)
    assert estimate_memory(LLAMA_7B, optimizer="adamw").breakdown["optimizer"] == 4 * base.breakdown["optimizer"]
    qv = estimate_memory(LLAMA_7B, target_modules="q_proj,v_proj")
    assert qv.lora_params == 16 * 2 * 8192 * 32
    assert estimate_memory(LLAMA_7B, loss_chunk=128).breakdown["logits"] < base.breakdown["logits"]
    sharded = estimate_memory(LLAMA_7B, num_processes=4, fsdp=True)
    assert sharded.breakdown["weights"] < base.breakdown["weights"] / 3


def test_gpt2_and_bad_inputs():
    est = estimate_memory(GPT2, bits=16)
    assert 120e6 < est.base_params < 130e6  # GPT-2 small: 124M
    with pytest.raises(EstimateError, match="hidden_size"):
        estimate_memory({"model_type": "llama", "num_hidden_layers": 2})
    with pytest.raises(EstimateError, match="match no linear layer"):
        estimate_memory(LLAMA_7B, target_modules="nope")
    with pytest.raises(EstimateError, match="optimizer"):
        estimate_memory(LLAMA_7B, optimizer="sgd")


def test_parse_size():
    assert parse_size("8GiB") == 8 * 1024**3
    assert parse_size("6 GB") == 6_000_000_000
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("2G") == parse_size("2GiB") == 2 * 1024**3  # merge --max-shard-size 2G reads too
    assert parse_size("2GB") == 2_000_000_000 and parse_size(1000) == parse_size("1000") == 1000
    assert parse_size("8", bare_unit="gib") == 8 * 1024**3  # a bare --budget is GiB, never 8 bytes
    for bad in ("lots", "0", "-1GB", "nan", "3 parsecs"):
        with pytest.raises(EstimateError, match="not a memory size"):
            parse_size(bad)


def test_merge_reads_shard_sizes_with_the_same_parser(tmp_path):
    from qlora_lite.errors import MergeError
    from qlora_lite.merge.write import merge_adapter

    with pytest.raises(MergeError, match="--max-shard-size: 'huge' is not a memory size"):
        merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", max_shard_size="huge")


def test_budget_suggestion_fits_and_gives_up_when_impossible():
    heavy = dict(bits=16, seq_len=2048, gradient_checkpointing=False, optimizer="adamw")
    changes, est = suggest_settings(LLAMA_7B, parse_size("6GiB"), **heavy)
    assert est.total <= parse_size("6GiB")
    assert changes["bits"] == 4 and changes["gradient_checkpointing"] is True
    assert estimate_memory(LLAMA_7B, **{**heavy, **changes}).total == est.total
    assert suggest_settings(LLAMA_7B, parse_size("1GiB")) is None
    assert suggest_settings(LLAMA_7B, parse_size("64GiB"), **heavy)[0] == {}


def test_cli_json_and_budget(llama_7b_dir):
    runner = CliRunner()
    result = runner.invoke(main, ["estimate", "--model", str(llama_7b_dir), "--budget", "8GiB", "--json",
                                  "--compute-dtype", "bf16", "--checkpoint-policy", "balanced"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["fits"] is True and data["total"] == sum(data["breakdown"].values())
    # fp32 compute (auto on CPUs without bf16 kernels) doubles activations and unquantized weights
    fp32 = runner.invoke(main, ["estimate", "--model", str(llama_7b_dir), "--json", "--compute-dtype", "fp32",
                                "--checkpoint-policy", "balanced"])
    parts = json.loads(fp32.output)["breakdown"]
    assert parts["activations"] == 2 * data["breakdown"]["activations"]
    assert parts["lora"] == 2 * data["breakdown"]["lora"] and parts["optimizer"] == data["breakdown"]["optimizer"]
    result = runner.invoke(main, ["estimate", "--model", str(llama_7b_dir / "config.json"), "--bits", "16",
                                  "--no-gradient-checkpointing", "--seq-len", "4096", "--budget", "8GiB"])
    assert result.exit_code == 1, result.output  # scripts read "does not fit" from the exit status
    assert "Does NOT fit" in result.output and "--bits 4" in result.output
    result = runner.invoke(main, ["estimate", "--model", str(llama_7b_dir / "missing")])
    assert result.exit_code != 0 and "does not exist" in result.output


def test_cli_budget_without_unit_is_gib_and_counts_are_readable():
    runner = CliRunner()
    result = runner.invoke(main, ["estimate", "--model", "demo", "--budget", "8"])
    assert result.exit_code == 0, result.output
    assert "Fits the budget of 8.00 GiB" in result.output
    header = result.output.splitlines()[1]
    assert header.startswith("  3.1M parameters,") and "K trainable" in header
    assert "adamw_8bit (paged_adamw_8bit falls back on the cpu)" in header  # what CPU training runs
    data = json.loads(runner.invoke(main, ["estimate", "--model", "demo", "--budget", "0.1", "--json"]).output)
    assert data["budget"] == int(0.1 * 1024**3) and data["fits"] is False


def test_cli_budget_below_the_runtime_says_no_model_fits():
    result = CliRunner().invoke(main, ["estimate", "--model", "demo", "--budget", "0.3GiB"])
    assert result.exit_code == 1
    assert "before any model is loaded, so no model fits" in result.output
    assert "smaller model" not in result.output


def test_checkpoint_policy_adds_what_it_keeps():
    """speed keeps every projection output per block, balanced the attention and down outputs, memory
    only the block input: 2 bytes per value, per token, per block; and a tight budget suggests
    keeping less before anything that changes training."""
    tokens, layers, hidden = 2 * 512, 32, 4096
    act = {p: estimate_memory(LLAMA_7B, seq_len=512, batch_size=2, checkpoint_policy=p).breakdown["activations"]
           for p in ("memory", "balanced", "speed")}
    assert act["balanced"] - act["memory"] == 2 * layers * tokens * 2 * hidden
    projections = 5 * 4096 + 2 * 11008  # q, k, v, o, down outputs (no GQA here), gate, up
    assert act["speed"] - act["memory"] == 2 * layers * tokens * (hidden + projections)
    speed = estimate_memory(LLAMA_7B, seq_len=512, batch_size=2, checkpoint_policy="speed")
    changes, fitted = suggest_settings(LLAMA_7B, speed.total - 1, seq_len=512, batch_size=2, checkpoint_policy="speed")
    assert changes == {"checkpoint_policy": "balanced"} and fitted.total < speed.total
    with pytest.raises(EstimateError, match="checkpoint_policy"):
        estimate_memory(LLAMA_7B, checkpoint_policy="fast")


def test_auto_checkpoint_policy_is_the_fastest_that_fits():
    from qlora_lite.train.fit import choose_checkpoint_policy

    totals = {p: estimate_memory(LLAMA_7B, checkpoint_policy=p).total for p in ("memory", "balanced", "speed")}
    assert choose_checkpoint_policy(LLAMA_7B, 2 * totals["speed"])[0] == "speed"
    assert choose_checkpoint_policy(LLAMA_7B, 2 * totals["speed"] - 1)[0] == "balanced"
    assert choose_checkpoint_policy(LLAMA_7B, 2 * totals["memory"])[0] == "memory"
    assert choose_checkpoint_policy(LLAMA_7B, None) == ("balanced", None)  # free memory unknown
    # a GPU is the run's alone: 75% of it may be planned; on the CPU, processes share the RAM
    assert choose_checkpoint_policy(LLAMA_7B, int(totals["speed"] / 0.75) + 1, device="cuda")[0] == "speed"
    per_process = estimate_memory(LLAMA_7B, checkpoint_policy="speed", num_processes=2).total
    assert choose_checkpoint_policy(LLAMA_7B, 4 * per_process, num_processes=2)[0] == "speed"
    assert choose_checkpoint_policy(LLAMA_7B, 4 * per_process - 1, num_processes=2)[0] == "balanced"


def test_auto_skips_checkpointing_when_it_would_save_little():
    """A tiny model or a short sequence trains without checkpointing (faster, about the same peak);
    a long one keeps it, because there checkpointing is most of what fits."""
    from qlora_lite.kernels.footprint import NO_CHECKPOINTING
    from qlora_lite.train.fit import CHECKPOINTING_WORTH, choose_checkpoint_policy

    plenty = 64 * 2**30
    policy, estimate = choose_checkpoint_policy(LLAMA_7B, plenty, seq_len=16)
    speed = estimate_memory(LLAMA_7B, seq_len=16, checkpoint_policy="speed")
    assert policy == NO_CHECKPOINTING
    assert estimate.total == estimate_memory(LLAMA_7B, seq_len=16, gradient_checkpointing=False).total
    assert estimate.total <= (1 + CHECKPOINTING_WORTH) * speed.total
    assert choose_checkpoint_policy(LLAMA_7B, plenty, seq_len=4096)[0] == "speed"
    # skipping must also fit: with only the speed policy's room, checkpointing stays on
    speed = estimate_memory(LLAMA_7B, seq_len=256, checkpoint_policy="speed")
    assert choose_checkpoint_policy(LLAMA_7B, plenty, seq_len=256)[0] == NO_CHECKPOINTING
    assert choose_checkpoint_policy(LLAMA_7B, 2 * speed.total, seq_len=256)[0] == "speed"


def test_loss_chunk_follows_the_vocabulary():
    """Training computes the loss in chunks of about 8M logits; the estimate counts what it holds."""
    from qlora_lite.kernels.footprint import loss_chunk_for

    assert [loss_chunk_for(v) for v in (320, 32000, 50257, 128256, 151936)] == [1024, 256, 128, 64, 64]
    assert estimate_memory(LLAMA_7B, seq_len=2048).breakdown["logits"] == 10 * 256 * 32000
    assert estimate_memory(LLAMA_7B, seq_len=2048, loss_chunk=None).breakdown["logits"] == 10 * 2048 * 32000
    capped = {**LLAMA_7B, "model_type": "gemma2", "final_logit_softcapping": 30.0}  # no chunked loss there
    assert estimate_memory(capped, seq_len=2048).breakdown["logits"] == 10 * 2048 * 32000


def test_budget_says_the_longest_sequence_that_fits():
    """``estimate --budget`` names the longest --max-seq-len whose estimate fits: one token more does not."""
    from qlora_lite.train.fit import longest_sequence

    budget = 12 * 2**30
    longest = longest_sequence(LLAMA_7B, budget, checkpoint_policy="memory")
    assert 512 < longest < 1 << 20
    assert estimate_memory(LLAMA_7B, seq_len=longest, checkpoint_policy="memory").fits(budget)
    assert not estimate_memory(LLAMA_7B, seq_len=longest + 1, checkpoint_policy="memory").fits(budget)
    assert longest_sequence(LLAMA_7B, 2**20, checkpoint_policy="memory") == 0  # not even the weights fit
    assert longest_sequence(LLAMA_7B, budget, limit=1024, checkpoint_policy="memory") == 1024  # the context caps it


def test_cli_budget_reports_the_longest_sequence(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**LLAMA_7B, "max_position_embeddings": 1 << 20}))
    result = CliRunner().invoke(main, ["estimate", "--model", str(tmp_path), "--budget", "12", "--json"])
    assert result.exit_code == 0, result.output
    longest = json.loads(result.output)["longest_seq_len"]
    assert estimate_memory(LLAMA_7B, seq_len=longest, checkpoint_policy="memory").fits(12 * 2**30)
    text = CliRunner().invoke(main, ["estimate", "--model", str(tmp_path), "--budget", "12"]).output
    assert f"about {longest} tokens" in text and "falls back to (memory)" in text


@pytest.mark.parametrize("policy", ["memory", "balanced", "speed"])
def test_estimate_counts_what_each_checkpoint_policy_keeps(tiny_llama, policy, monkeypatch):
    """The values per token and block the estimate counts for a policy are the block input plus the
    outputs the policy really saves in the forward (memory: none, plain checkpointing); long
    sequences are mostly this term."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    from qlora_lite.kernels import checkpoint_policy as cp
    from qlora_lite.kernels.chunked_loss import causal_lm_loss
    from qlora_lite.model.build import build_model
    from qlora_lite.train.estimate import KEPT_PER_BLOCK, model_shape, read_config

    kept = []  # numel of each output saved in the forward (not in the recompute)
    create = cp.create_selective_checkpoint_contexts

    def recording(decide):
        def wrapped(ctx, op, *args, **kwargs):
            choice = decide(ctx, op, *args, **kwargs)
            if choice == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
                mm = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
                kept.append(args[-2].shape[0] * args[-1].shape[1] if mm else args[0].numel())
            return choice
        return create(wrapped)

    monkeypatch.setattr(cp, "create_selective_checkpoint_contexts", recording)
    model = build_model(str(tiny_llama), bits=4, rank=4, dropout=0.0, seed=0, gradient_checkpointing=True,
                        checkpoint_policy=policy, compute_dtype="bf16")
    tokens = 2 * 24
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    causal_lm_loss(model, ids, ids).backward()
    shape = model_shape(read_config(tiny_llama)[0])
    # the policy recomputes outputs narrower than 64 (it tells LoRA's thin matmuls apart by width): this
    # tiny model's k and v projections (32 wide); every real model's projections are wider
    narrow = sum(o for _, _, o in shape.linears if o < 64) if policy == "speed" else 0
    assert (policy == "memory") == (not kept)
    assert shape.hidden + sum(kept) / (tokens * shape.layers) == KEPT_PER_BLOCK[policy](shape) - narrow


TINYLLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32,
                "num_hidden_layers": 22, "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False}


def test_cpu_heap_grows_with_the_length_and_matches_the_measured_longest_sequence():
    """On the CPU glibc keeps freed activation buffers, so the heap term grows with the tokens (on CUDA
    there is none); with it, the longest 1.1B sequence in 3 GiB falls where the long-context benchmark
    measured it (3072 tokens trained within 3 GiB, 3584 did not; BENCHMARKS.md). Without the growing
    term the estimate said 7527."""
    from qlora_lite.train.fit import longest_sequence

    heaps = [estimate_memory(TINYLLAMA_1B, seq_len=n, checkpoint_policy="memory").breakdown["heap"]
             for n in (1024, 2048, 3072)]
    assert heaps[2] - heaps[1] == heaps[1] - heaps[0] > 0
    assert estimate_memory(TINYLLAMA_1B, seq_len=4096, device="cuda").breakdown["heap"] == 0
    assert 3072 <= longest_sequence(TINYLLAMA_1B, 3 * 2**30, checkpoint_policy="memory") < 3584
