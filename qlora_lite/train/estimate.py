"""Predict the peak memory of a QLoRA training run from ``config.json`` alone (no weights are read).

The model is described by its shapes; each part of the peak is counted in bytes:

- ``weights``: the frozen base; quantized linear layers at 4 or 8 bits, embeddings, head and norms
  in the compute dtype (16-bit, or fp32 on CPUs without bf16 kernels: ``precision``).
- ``quant_constants``: the per-block scales of the quantized layers (absmax, double-quant tables).
- ``lora``: adapter weights and their gradients (in the compute dtype; fp32 under fp16).
- ``optimizer``: AdamW moments: 8 bytes per adapter parameter in fp32, about 2 in 8-bit.
- ``activations``: with checkpointing, each block's input, attention and down-projection outputs (6*L*B*T*H
  bytes in bf16, twice that in fp32) plus one block's working set while it is recomputed; without,
  every block's working set.
- ``logits``: the output head's logits and the loss over them (fp32), or one chunk when the loss is
  computed chunk by chunk.
- ``runtime``: what the process holds before any model (torch, libraries, allocator).
- ``heap``: on the CPU, freed buffers glibc keeps for reuse (dequantized weights, matmul outputs):
  measured as about three blocks of dequantized weights plus two working sets of one block (which
  grow with the length, and dominate at long lengths). Returning every large buffer to the OS
  (``MALLOC_MMAP_THRESHOLD_``) removes it but makes steps much slower (page faults; BENCHMARKS.md).

The constants were checked against measured peaks (tools/benchmark.py compares the two).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlora_lite.config import DEMO_MODEL
from qlora_lite.errors import EstimateError
from qlora_lite.flag_values import select_targets
from qlora_lite.kernels.footprint import CHUNKED_LOSS_MODELS, NO_CHECKPOINTING, loss_chunk_for

GIB = 1024**3


# Bytes per parameter of a quantized linear layer: the data and the per-block constants.
# NF4/FP4: 4 bits + one absmax per 64 weights (fp32, or 8-bit plus one fp32 per 256 blocks with
# double quantization). Int8: 1 byte + one fp32 scale per output row (counted per row below).
QUANT_BYTES = {4: 0.5, 8: 1.0, 16: 2.0}
DQ_CONST_BYTES = 1 / 64 + 4 / (64 * 256)
NO_DQ_CONST_BYTES = 4 / 64
OPTIMIZER_BYTES = {"paged_adamw_8bit": 2.0, "adamw_8bit": 2.0, "paged_adamw_32bit": 8.0, "adamw": 8.0}


# Process memory besides the model. CPU: torch + transformers + bitsandbytes imported, plus what the
# first training step pages in (autograd and oneDNN kernels, thread stacks), measured by
# tools/benchmark.py (BENCHMARKS.md). CUDA: the allocator's peak excludes the context.
RUNTIME_BYTES = {"cpu": int(0.56e9), "cuda": int(0.05e9)}


# Freed-but-kept glibc heap during CPU training, in blocks of linear weights, fitted to the measured
# 1.1B peaks (BENCHMARKS.md, "Where the memory goes"); small models hardly show it.
HEAP_BLOCKS = 3

# ... and in working sets of one block, which grow with the length: glibc does not hand a freed
# activation buffer back, nor always reuse it for the next block's, so at long lengths the peak holds
# about this many more block working sets (fitted to the 1.1B long-context peaks, BENCHMARKS.md).
HEAP_WORKING_SETS = 2.5


# Bytes per activation, dequantized weight and unquantized weight in each compute dtype.
VALUE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on."""

    model_type: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    tied: bool
    linears: list[tuple[str, int, int]]  # (name suffix, in_features, out_features) of one block

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for _, i, o in self.linears)

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the output head (once when tied) plus the norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params


@dataclass
class MemoryEstimate:
    """Predicted peak memory of one training process, in bytes.

    Attributes:
        breakdown: bytes per part (weights, quant_constants, lora, optimizer, activations, logits,
            runtime); the parts sum to ``total``.
        settings: the settings the estimate was made for.
        lora_params: trainable adapter parameters.
    """

    breakdown: dict[str, int]
    settings: dict
    lora_params: int
    base_params: int
    total: int = field(init=False)

    def __post_init__(self):
        self.total = sum(self.breakdown.values())

    def fits(self, budget: int) -> bool:
        return self.total <= budget

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A plain-text table of the breakdown in GiB."""
        rows = [f"  {name:<16} {value / GIB:8.3f} GiB" for name, value in self.breakdown.items()]
        return "\n".join(rows + [f"  {'total':<16} {self.total / GIB:8.3f} GiB"])


def read_config(config: dict | str | Path) -> tuple[dict, str]:
    """A config dict and a name for messages, from a dict, a config.json file or a model folder."""
    if isinstance(config, dict):
        return config, "config"
    path = Path(config).expanduser()
    if str(config) == "demo" and not path.exists():
        path = DEMO_MODEL
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise EstimateError(f"{path} does not exist; pass a model folder or its config.json")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise EstimateError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def model_shape(config: dict, where: str = "config") -> ModelShape:
    """The shapes of a LLaMA-family (llama, mistral, qwen2, gemma, phi3, ...) or GPT-2 config.

    Raises:
        EstimateError: a needed key (hidden size, layers, heads, vocab) is missing.
    """
    config = config.get("text_config", config)

    def get(*keys, default=None):
        for k in keys:
            if config.get(k) is not None:
                return config[k]
        if default is None:
            raise EstimateError(f"{where}: no {' / '.join(keys)} key; cannot size the model")
        return default

    model_type = config.get("model_type", "llama")
    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head")
    vocab = get("vocab_size")
    tied = bool(config.get("tie_word_embeddings", model_type in ("gpt2", "gemma", "gemma2")))
    if model_type == "gpt2":
        inter = config.get("n_inner") or 4 * hidden
        linears = [("c_attn", hidden, 3 * hidden), ("attn.c_proj", hidden, hidden),
                   ("c_fc", hidden, inter), ("mlp.c_proj", inter, hidden)]
        return ModelShape(model_type, hidden, layers, inter, vocab, tied, linears)
    inter = get("intermediate_size", default=4 * hidden)
    kv_heads = get("num_key_value_heads", default=heads)
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    if model_type == "phi3":
        linears = [("qkv_proj", hidden, q + 2 * kv), ("o_proj", q, hidden),
                   ("gate_up_proj", hidden, 2 * inter), ("down_proj", inter, hidden)]
    else:
        linears = [("q_proj", hidden, q), ("k_proj", hidden, kv), ("v_proj", hidden, kv), ("o_proj", q, hidden),
                   ("gate_proj", hidden, inter), ("up_proj", hidden, inter), ("down_proj", inter, hidden)]
    return ModelShape(model_type, hidden, layers, inter, vocab, tied, linears)


def lora_targets(shape: ModelShape, target_modules: str | list[str]) -> list[tuple[str, int, int]]:
    """The block's linear layers LoRA wraps, chosen by the rule training uses (``flag_values.select_targets``)."""
    names, _ = select_targets([name for name, _, _ in shape.linears], target_modules)
    chosen = [lin for lin in shape.linears if lin[0] in names]
    if not chosen:
        names = ", ".join(name for name, _, _ in shape.linears)
        raise EstimateError(f"target modules {target_modules!r} match no linear layer; this model has: {names}")
    return chosen


# Values of width 1 kept per token and block by each checkpoint policy: the block input; balanced
# adds the attention and down-projection outputs; speed every projection output.
KEPT_PER_BLOCK = {
    "memory": lambda shape: shape.hidden,
    "balanced": lambda shape: 3 * shape.hidden,
    "speed": lambda shape: 2 * shape.hidden + sum(o for _, _, o in shape.linears),
}


def estimate_memory(
    config: dict | str | Path,
    *,
    bits: int = 4,
    seq_len: int = 512,
    batch_size: int = 1,
    rank: int = 16,
    target_modules: str | list[str] = "all-linear",
    gradient_checkpointing: bool = True,
    checkpoint_policy: str = "balanced",
    optimizer: str = "paged_adamw_8bit",
    num_processes: int = 1,
    fsdp: bool = False,
    double_quant: bool = True,
    loss_chunk: int | str | None = "auto",
    device: str = "cpu",
    compute_dtype: str = "bf16",
    dora: bool = False,
    sequences_per_example: int = 1,
) -> MemoryEstimate:
    """Predict the peak memory of one training process from the model's config alone.

    Args:
        config: a config dict, a config.json path or a model folder.
        bits: 4, 8 or 16 for the frozen linear layers.
        seq_len, batch_size: tokens per micro-batch are ``batch_size * seq_len * sequences_per_example``.
        sequences_per_example: 2 for preference pairs (chosen and rejected go through in one batch; the
            DPO reference forward runs without grad and keeps nothing).
        rank, target_modules: the LoRA adapters.
        checkpoint_policy: what checkpointing keeps per block (``kernels.checkpoint_policy.selective_checkpoint_context``):
            memory (the block input), balanced (+ attention and down-projection outputs) or speed
            (+ every projection output); ``NO_CHECKPOINTING`` is gradient_checkpointing=False.
        optimizer: one of OPTIMIZER_BYTES.
        num_processes, fsdp: with FSDP the frozen weights are sharded over the processes (one block
            is gathered at a time); adapters and optimizer states stay whole on every process
            (``train.distributed.shard_frozen_base``). Without FSDP each process holds everything.
        loss_chunk: tokens per chunk of the loss; "auto" what training does (``loss_chunk_for`` the
            vocabulary where the architecture allows chunking, else full logits); None: full logits.
        device: "cpu" (process RSS) or "cuda" (``torch.cuda.max_memory_allocated``).
        compute_dtype: bf16, fp16 or fp32 (``model.precision.estimated_compute_dtype`` resolves auto): the
            size of activations, dequantized weights, unquantized layers and adapters.
        dora: DoRA adapters: one more trainable value per output channel of each adapted layer, and
            the fp32 dequantized weight each DoRA layer's norm needs for a moment.

    Returns:
        MemoryEstimate for one process.

    Raises:
        EstimateError: unknown bits/optimizer/device, or a config without the needed sizes.
    """
    raw, where = read_config(config)
    if bits not in QUANT_BYTES:
        raise EstimateError(f"bits must be 4, 8 or 16, got {bits}")
    if optimizer not in OPTIMIZER_BYTES:
        raise EstimateError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_BYTES)}")
    if device not in RUNTIME_BYTES:
        raise EstimateError(f"device must be cpu or cuda, got {device!r}")
    if checkpoint_policy not in (*KEPT_PER_BLOCK, NO_CHECKPOINTING):
        raise EstimateError(f"checkpoint_policy must be one of {', '.join(KEPT_PER_BLOCK)}, got {checkpoint_policy!r}")
    if checkpoint_policy == NO_CHECKPOINTING:
        gradient_checkpointing = False
    if compute_dtype not in VALUE_BYTES:
        raise EstimateError(f"compute_dtype must be one of {', '.join(VALUE_BYTES)}, got {compute_dtype!r}")
    value = VALUE_BYTES[compute_dtype]
    shape = model_shape(raw, where)
    tokens = batch_size * seq_len * sequences_per_example
    const_per_param = (DQ_CONST_BYTES if double_quant else NO_DQ_CONST_BYTES) if bits == 4 else 0.0
    rows = shape.layers * sum(o for _, _, o in shape.linears)
    weights = shape.linear_params * (value if bits == 16 else QUANT_BYTES[bits]) + value * shape.embedding_params
    constants = shape.linear_params * const_per_param + (4 * rows if bits == 8 else 0)

    targets = lora_targets(shape, target_modules)
    lora_params = shape.layers * sum(rank * (i + o) + (o if dora else 0) for _, i, o in targets)
    lora_value = 4 if compute_dtype == "fp16" else value  # fp16 trains fp32 master weights (loss scaler)
    lora = lora_params * 2 * lora_value  # weight + gradient
    optim = lora_params * OPTIMIZER_BYTES[optimizer]

    shard = num_processes if fsdp and num_processes > 1 else 1
    block_bytes = (weights - value * shape.embedding_params + constants) / shape.layers
    weights, constants = weights / shard, constants / shard  # LoRA and its optimizer state are replicated
    activations = _activation_bytes(shape, targets, tokens, rank, bits,
                                    checkpoint_policy if gradient_checkpointing else None, value)
    if dora:  # each DoRA layer's norm: its weight dequantized to fp32 for a moment (when it is the largest)
        activations += 4 * max(i * o for _, i, o in targets)
    if shard > 1:
        activations += 2 * block_bytes  # the gathered block and the next one being prefetched
    if num_processes > 1 and not fsdp:
        lora += lora_params * lora_value  # DDP's gradient buckets hold a second copy of the gradients
    if loss_chunk == "auto":
        chunked = shape.model_type in CHUNKED_LOSS_MODELS and not raw.get("final_logit_softcapping")
        loss_chunk = loss_chunk_for(shape.vocab) if chunked else None
    logits = _logit_bytes(shape.vocab, tokens, loss_chunk)
    heap = 0
    if device == "cpu":
        heap = (HEAP_BLOCKS * value * sum(i * o for _, i, o in shape.linears)
                + HEAP_WORKING_SETS * _block_working_set(shape, targets, tokens, rank, value))
    breakdown = {"weights": weights, "quant_constants": constants, "lora": lora, "optimizer": optim,
                 "activations": activations, "logits": logits, "runtime": RUNTIME_BYTES[device], "heap": heap}
    settings = dict(bits=bits, seq_len=seq_len, batch_size=batch_size, rank=rank,
                    target_modules=target_modules, gradient_checkpointing=gradient_checkpointing,
                    checkpoint_policy=checkpoint_policy, optimizer=optimizer, num_processes=num_processes, fsdp=fsdp,
                    double_quant=double_quant, loss_chunk=loss_chunk, device=device, compute_dtype=compute_dtype,
                    dora=dora, sequences_per_example=sequences_per_example)
    return MemoryEstimate({k: int(v) for k, v in breakdown.items()}, settings, lora_params, shape.params)


def _activation_bytes(shape: ModelShape, targets, tokens: int, rank: int, bits: int, policy: str | None,
                      value: int = 2) -> float:
    """Saved block inputs plus working sets, plus one dequantized weight during a matmul; ``value``
    bytes per number (2 in bf16/fp16, 4 in fp32).

    ``policy`` is the checkpoint policy (``KEPT_PER_BLOCK``), None without checkpointing.

    A block's working set: norms, q/k/v/o and attention outputs (~12 values of width H per token),
    the MLP's gate, up, activation and product (4 of width I), and each adapter's rank-r input.
    With a 4-bit base and checkpointing, the recomputed block keeps its dequantized weights
    until their backward (``kernels.lora_4bit``: one dequantization per layer saved).
    """
    block = _block_working_set(shape, targets, tokens, rank, value)
    largest = max(i * o for _, i, o in shape.linears)
    dequant = value * largest if bits in (4, 8) else 0
    if policy is not None:
        kept = value * sum(i * o for _, i, o in shape.linears) if bits == 4 else 0
        saved = value * shape.layers * tokens * KEPT_PER_BLOCK[policy](shape)  # values kept per token
        return saved + block + max(dequant, kept)
    return shape.layers * block + dequant


def _block_working_set(shape: ModelShape, targets, tokens: int, rank: int, value: int) -> int:
    """Bytes one block keeps for its backward: ~12 values of width H and 4 of width I per token, and
    each adapter's rank-r input."""
    per_token = value * (12 * shape.hidden + 4 * shape.intermediate) + len(targets) * rank * value
    return tokens * per_token


def _logit_bytes(vocab: int, tokens: int, loss_chunk: int | None) -> float:
    """bf16 logits, their fp32 log-softmax and the fp32 gradient: 10 bytes per logit at the peak."""
    width = tokens if loss_chunk is None else min(tokens, loss_chunk)
    return 10 * width * vocab
