"""Text generation for ``generate``, ``eval`` and ``demo``: prompts, streaming, batched greedy answers.

Generation runs on the same model the training code builds (quantized base + LoRA layers), so an
adapter can be tried without merging it. On the CPU, 4-bit layers run as dequantize + matmul
(model.bnb switches off bitsandbytes' CPU repack), which is fine for small models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import TextStreamer

from qlora_lite.data.tokenize import DEFAULT_CHAT_TEMPLATE, encode_prompt
from qlora_lite.model.adapter import read_adapter
from qlora_lite.model.build import build_model
from qlora_lite.model.folder import load_tokenizer


def adapter_bits(adapter_dir: str | Path | None) -> int | None:
    """The bits of the base an adapter was trained against (from qlora_lite.json), when recorded."""
    if not adapter_dir:
        return None

    _, _, record = read_adapter(adapter_dir)
    return (record or {}).get("bits")


def load_for_inference(model_path: str, *, adapter: str | None = None, bits: int | None = None,
                       quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "auto",
                       trust_remote_code: bool = False, allow_bin_weights: bool = False):
    """Load base (+ adapter) frozen in eval mode, and its tokenizer (pad token guaranteed).

    Args:
        bits: 4, 8 or 16; ``None`` means the bits the adapter was trained with, else 16.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        errors.ModelLoadError, errors.AdapterError: with the folder and what is wrong.
    """
    if bits is None:
        bits = adapter_bits(adapter) or 16
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)  # first: a broken one fails in a second
    model = build_model(model_path, bits=bits, quant_type=quant_type, double_quant=double_quant,
                        compute_dtype=compute_dtype, trust_remote_code=trust_remote_code,
                        allow_bin_weights=allow_bin_weights, adapter=adapter, trainable=False)
    if torch.cuda.is_available():
        model = model.to("cuda")  # the loader builds on the CPU; bitsandbytes moves quantized weights as they are
    return model, tokenizer


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The text the model continues: the chat template with the assistant turn opened.

    A tokenizer without a chat template gets ``data.DEFAULT_CHAT_TEMPLATE``, as in training.
    """
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)


def prompt_ids(tokenizer, text: str, fmt: str = "chat") -> list[int]:
    """Token ids of a prompt exactly as training tokenized it (``data.encode_prompt``; BOS rules included)."""
    return encode_prompt(text, tokenizer, fmt)


def sampling_kwargs(temperature: float, top_p: float, top_k: int) -> dict:
    """``generate`` arguments: greedy decoding when temperature is 0, else sampling."""
    if temperature <= 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}


@torch.no_grad()
def generate_reply(model: nn.Module, tokenizer, ids: list[int], *, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, top_k: int = 50, seed: int | None = None,
                   stream: bool = False) -> str:
    """Continue the prompt ``ids``; with ``stream`` tokens are printed to stdout as they come.

    Returns:
        The reply text, special tokens removed.
    """
    if seed is not None:
        torch.manual_seed(seed)
    input_ids = torch.tensor([ids], dtype=torch.long, device=model_device(model))  # (1, T)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        streamer=streamer, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        **sampling_kwargs(temperature, top_p, top_k),
    )
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, T_max), padded on the left so replies start aligned."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=torch.long)
    return input_ids, mask


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 32,
                   batch_size: int = 16) -> list[str]:
    """Greedy replies to many tokenized prompts, in left-padded batches; each reply stops at EOS.

    Returns:
        One decoded reply per prompt (special tokens removed), in order.
    """
    was_training = model.training
    model.eval()
    replies = []
    try:
        for start in range(0, len(prompts), batch_size):
            input_ids, mask = left_pad(prompts[start:start + batch_size], tokenizer.pad_token_id)
            input_ids, mask = input_ids.to(model_device(model)), mask.to(model_device(model))
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 **sampling_kwargs(0, 1, 0))
            replies += tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return replies
