"""Run a model folder forward with only one decoder block's weights in memory at a time.

``from_pretrained`` materialises every weight, so checking a merged 1.1B model in bf16 peaked at
the size of the whole model. Here the skeleton is built on the meta device, the small non-block
tensors (embeddings, final norm, head) are read up front, and each decoder block's tensors are read
just before that block runs and dropped right after, by forward hooks on the blocks. Tensors are read
with plain reads (``safetensors_io``), not memory maps: mapped pages stay in the process RSS.
The logits are the same as ``from_pretrained`` gives: same weights, same dtype, same modules.

The merge check's probe runs both of its sides this way (the merged folder in its own config and in
the base's), so neither ever holds a whole model; base plus an unmerged adapter, each base weight
passed through the quantization training used, streams the same way (``adapter_dir``, ``transform``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from qlora_lite.errors import ModelLoadError, SafetensorsError
from qlora_lite.kernels.chunked_loss import supports_chunked_loss
from qlora_lite.model.adapter import load_adapter
from qlora_lite.model.folder import read_model_config, weight_files
from qlora_lite.model.loading import checkpoint_key_map, decoder_blocks, meta_model, release_freed_memory
from qlora_lite.storage.safetensors_io import TensorEntry, iter_tensors, read_headers, read_rows


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of parameter/buffer ``name`` (replacing the meta one, not copying).

    The tensor takes the dtype the skeleton chose for that slot, as ``from_pretrained`` casts it
    (files in another dtype, modules kept in fp32); a merged folder is already in that dtype.
    """
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    current = module._parameters.get(leaf, module._buffers.get(leaf))
    if current is not None and current.dtype != tensor.dtype:
        tensor = tensor.to(current.dtype)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def _to_meta(module: nn.Module, leaf: str) -> None:
    """Drop one parameter's storage: it becomes a meta tensor of the same shape (no memory)."""
    param = module._parameters[leaf]
    module._parameters[leaf] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


def _drop_block(model: nn.Module, pairs: list, trim: bool = True) -> None:
    """Free the tensors a block read (its adapter, loaded up front, stays). glibc keeps the freed
    buffers in its heap, so RSS would grow by a block's weights per block; trimming after each block
    keeps it at one block."""
    for _, name in pairs:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            _to_meta(module, leaf)
    if trim:
        release_freed_memory()


def _group_entries(model: nn.Module, entries: list[TensorEntry], prefix: str, count: int,
                   model_dir: Path) -> tuple[list, list]:
    """Split checkpoint entries into non-block ones and one list per block, with model names
    (``model.loading.checkpoint_key_map``, also when a LoRA wrapper moved a layer to ``base_layer``).

    Returns:
        ``(rest, per_block)``: lists of ``(entry, parameter name)``; keys the model lacks are skipped
        (buffers some files carry, e.g. rotary ``inv_freq``).
    """
    resolve = checkpoint_key_map(model, model_dir, wrapped=True)
    rest, per_block = [], [[] for _ in range(count)]
    for entry in entries:
        name = resolve(entry.name)
        if name is None:
            continue
        index = name.removeprefix(f"{prefix}.").split(".", 1)[0] if name.startswith(f"{prefix}.") else ""
        if index.isdigit():
            per_block[int(index)].append((entry, name))
        else:
            rest.append((entry, name))
    return rest, per_block


def _load(model: nn.Module, pairs: list, transform=None) -> None:
    """Read ``(entry, name)`` pairs from disk into the model, one tensor at a time, each passed through
    ``transform(checkpoint_key, tensor)`` when given.

    Raises:
        ModelLoadError: a shard is truncated or unreadable.
    """
    by_entry = {id(entry): name for entry, name in pairs}
    try:
        for entry, tensor in iter_tensors([entry for entry, _ in pairs]):
            _set_tensor(model, by_entry[id(entry)], transform(entry.name, tensor) if transform else tensor)
    except (SafetensorsError, OSError) as e:
        raise ModelLoadError(f"cannot read the model weights ({e})") from e


@contextmanager
def streamed_model(model_dir: str | Path, dtype: torch.dtype, trust_remote_code: bool = False, *,
                   adapter_dir: str | Path | None = None, transform=None, defer_ends: bool = False,
                   config_dir: str | Path | None = None):
    """A model of ``model_dir`` in eval mode whose decoder blocks load their weights only while they run.

    Use it for forward passes (no generation cache reuse across blocks is needed for one pass):
    ``with streamed_model(folder, torch.bfloat16) as model: logits = model(input_ids=ids).logits``.
    Peak memory is the non-block tensors plus one block (plus activations).

    Args:
        adapter_dir: a LoRA adapter (PEFT layout) to wrap around the base layers, unmerged, exactly as
            ``model.adapter.load_adapter`` does for training; its weights are small and read up front.
        transform: ``transform(checkpoint_key, tensor) -> tensor`` applied to every tensor read, e.g. to
            quantize and dequantize base weights as training held them.
        defer_ends: leave a plain, untied embedding matrix and output head unread (on meta); their
            checkpoint entries are in ``model.qlora_deferred`` (``{"embed": .., "head": ..}``) for
            ``streamed_logits``, which reads them only when it needs them.
        config_dir: build the model from this folder's config.json instead of ``model_dir``'s (the
            merge check runs a merged folder's weights in the base's model definition).

    Raises:
        ModelLoadError: no safetensors weights, unreadable files, or a parameter the files lack.
    """
    model_dir = Path(model_dir)
    config = read_model_config(Path(config_dir or model_dir), trust_remote_code)
    model = meta_model(config, trust_remote_code=trust_remote_code, dtype=dtype)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    model.eval()
    prefix, blocks = decoder_blocks(model)
    rest, per_block = _group_entries(model, read_headers(weight_files(model_dir)), prefix, len(blocks), model_dir)
    ends = _plain_ends(model) if defer_ends else {}
    deferred = {role: pair for pair in rest for role, name in ends.items() if pair[1] == name}
    _load(model, [pair for pair in rest if pair[1] not in ends.values()], transform)
    model.tie_weights()  # a tied head is absent from the files: share the embedding read above
    _check_loaded(model, prefix, model_dir, skip=set(ends.values()))
    model.qlora_deferred = deferred if len(deferred) == 2 else {}
    if ends and not model.qlora_deferred:
        _load(model, list(deferred.values()), transform)  # one of the two is not in the files
        _check_loaded(model, prefix, model_dir)
    handles = []
    for block, pairs in zip(blocks, per_block):
        # Default arguments bind this block's tensors; the hooks ignore the module inputs/outputs.
        handles.append(block.register_forward_pre_hook(
            lambda m, _a, p=pairs: _load_block(model, m, p, model_dir, transform)))
        handles.append(block.register_forward_hook(lambda m, _a, _o, p=pairs: _drop_block(model, p)))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for pairs in per_block:
            _drop_block(model, pairs, trim=False)
        release_freed_memory()


def _load_block(model: nn.Module, block: nn.Module, pairs: list, model_dir: Path, transform=None) -> None:
    """Read one block's tensors; a parameter the files lack would otherwise fail deep in forward."""
    _load(model, pairs, transform)
    missing = [n for n, p in block.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"{model_dir}: the weights lack {', '.join(missing[:5])} of a decoder block; "
                             "the folder is incomplete")


def _check_loaded(model: nn.Module, prefix: str, model_dir: Path, skip: set[str] = frozenset()) -> None:
    """Fail clearly if a non-block parameter is still on meta (the files lack it)."""
    missing = [n for n, p in model.named_parameters()
               if p.is_meta and not n.startswith(f"{prefix}.") and n not in skip]
    if missing:
        raise ModelLoadError(f"{model_dir}: the weights lack {', '.join(missing[:5])}; the folder is incomplete")


def _plain_ends(model: nn.Module) -> dict[str, str]:
    """Parameter names of the embedding matrix and output head when both are plain and untied (the
    logits are then ``embedding rows -> decoder -> hidden @ head^T``), else ``{}``."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and (head.weight is embed.weight or getattr(model.config, "tie_word_embeddings", False))
    if type(embed) is not nn.Embedding or not supports_chunked_loss(model) or tied:
        return {}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return {"embed": names[id(embed.weight)], "head": names[id(head.weight)]}


# Output-head rows multiplied at once: the logits never need the whole head in the compute dtype
# (in fp32 it is twice the size of the file's bf16).
_HEAD_CHUNK_ELEMENTS = 1 << 22


def _read_rows(model: nn.Module, pair, transform, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a deferred tensor, read now, in the dtype of its slot in the model
    (``transform`` sees the rows alone: it must act on rows, as casts do)."""
    entry, name = pair
    owner, _, leaf = name.rpartition(".")
    tensor = read_rows(entry, start, stop)
    tensor = transform(entry.name, tensor) if transform else tensor
    return tensor.to(getattr(model.get_submodule(owner), leaf).dtype)


def streamed_logits(model_dir: str | Path, dtype: torch.dtype, input_ids: torch.Tensor, *,
                    trust_remote_code: bool = False, adapter_dir: str | Path | None = None,
                    transform=None, config_dir: str | Path | None = None) -> torch.Tensor:
    """fp32 logits (B, T, V) of ``input_ids`` (B, T), equal to ``from_pretrained(...)(input_ids).logits``.

    One decoder block is in memory at a time (``streamed_model``); of a plain untied embedding matrix
    only the rows of ``input_ids`` are read, and the output head is read after the last block, a
    chunk of rows at a time, so neither is ever held whole.
    """
    with streamed_model(model_dir, dtype, trust_remote_code, adapter_dir=adapter_dir, transform=transform,
                        defer_ends=True, config_dir=config_dir) as model, torch.no_grad():
        deferred = model.qlora_deferred
        if not deferred:
            return model(input_ids=input_ids).logits.float()
        tokens, positions = torch.unique(input_ids, return_inverse=True)
        rows = torch.cat([_read_rows(model, deferred["embed"], transform, t, t + 1) for t in tokens.tolist()])
        hidden = model.base_model(inputs_embeds=rows[positions], use_cache=False).last_hidden_state
        head = deferred["head"][0]
        step = max(1, _HEAD_CHUNK_ELEMENTS // max(1, hidden.shape[-1]))
        return torch.cat([nn.functional.linear(hidden, _read_rows(model, deferred["head"], transform, s, s + step))
                          .float() for s in range(0, head.shape[0], step)], dim=-1)
