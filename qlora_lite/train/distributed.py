"""Several processes (GPUs, machines) through accelerate: launching, per-process helpers and FSDP.

accelerate is the engine: it starts the processes (``accelerate launch`` / ``--num-processes``), sets
up the process group (NCCL on GPUs, gloo on the CPU) and wraps the model in DDP. This module adds
only what qlora-lite needs around it:

- ``relaunch``: ``qlora-lite train --num-processes N`` re-runs itself under accelerate's launcher.
- ``pad_to_equal_batches``: every process runs the same number of forward passes (collectives in
  DDP/FSDP forwards would otherwise wait forever on the process that has fewer).
- ``shard_frozen_base`` / ``all_reduce_grads``: FSDP for 4-bit models too large for one device. The
  frozen base (4-bit data stored as the compute dtype, as in FSDP-QLoRA) is sharded with torch's
  ``fully_shard``; the small LoRA weights stay whole on every process, so the optimizer, checkpoints
  and adapter files work as in one process. Their gradients are averaged here, as DDP would.

How the data is split (``train.batches.epoch_batches``): each optimizer step takes the same examples of one
seeded permutation whatever the process count; process r gets examples r, r+N, ... of each global
micro-batch, and the loss is divided by the label tokens of all processes together.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from qlora_lite.errors import LaunchError, ModelLoadError
from qlora_lite.kernels.bnb_import import bnb
from qlora_lite.kernels.footprint import IGNORE_INDEX
from qlora_lite.model.loading import decoder_blocks

log = logging.getLogger(__name__)


# Variables a launcher (torchrun / accelerate launch / mpirun) sets in every process it starts.
_LAUNCH_VARS = ("LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def in_launched_process() -> bool:
    """True inside a process started by ``accelerate launch``/torchrun/mpirun (even with one process)."""
    return any(v in os.environ for v in _LAUNCH_VARS) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not launched)."""
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def is_main_process() -> bool:
    return process_rank() == 0


def free_port() -> int:
    """A TCP port that is free now on this machine (for the rendezvous of a single-machine launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes: int, args: list[str], *, port: int | None = None) -> tuple[list[str], dict]:
    """The command and environment that run ``qlora-lite <args>`` in ``num_processes`` processes here.

    accelerate's multi-process launcher (torch.distributed.run underneath) starts the processes; on a
    machine without CUDA ``ACCELERATE_USE_CPU`` makes them join one gloo process group on the CPU.

    Args:
        num_processes: processes on this machine (one per GPU).
        args: the qlora-lite command line after the program name, e.g. ``["train", "--model", ...]``.
        port: rendezvous port; a free one when None.

    Returns:
        ``(argv, env)`` for ``subprocess.run``.

    Raises:
        LaunchError: more processes than visible CUDA GPUs.
    """
    env = dict(os.environ)
    cuda = torch.cuda.is_available()
    if cuda and num_processes > torch.cuda.device_count():
        raise LaunchError(f"--num-processes {num_processes}, but only {torch.cuda.device_count()} CUDA GPU(s) are "
                          "visible; use at most one process per GPU (CUDA_VISIBLE_DEVICES selects them)")
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
        # Each process computes with its share of the cores instead of all of them fighting.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",  # train() picks the precision itself
            "--main_process_port", str(port or free_port()),
            "-m", "qlora_lite.cli", *args]
    return argv, env


def relaunch(num_processes: int, args: list[str]) -> int:
    """Run ``qlora-lite <args>`` again in ``num_processes`` processes and wait; returns their exit code.

    Raises:
        LaunchError: see ``launch_command``.
    """
    argv, env = launch_command(num_processes, args)
    log.info("launching %d processes: %s", num_processes, " ".join(argv))
    return subprocess.run(argv, env=env, check=False).returncode


def check_same_checkpoint(accelerator, checkpoint, output_dir) -> None:
    """Refuse to start when the processes found different checkpoints to resume (a collective: all call it).

    On several machines ``--output`` must be one folder they all see (a shared filesystem): only the
    main process writes checkpoints, and every process loads the same one on ``--resume``.

    Raises:
        LaunchError: naming what each process found.
    """
    step = int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint is not None else -1
    steps = accelerator.gather(torch.tensor([step], device=accelerator.device)).tolist()
    if len(set(steps)) > 1:
        found = ", ".join(f"process {i}: " + (f"checkpoint-{s}" if s >= 0 else "none") for i, s in enumerate(steps))
        raise LaunchError(f"--resume: the processes found different checkpoints in {output_dir} ({found}); on "
                          "several machines put --output on a filesystem they all share")


def rescale_position(consumed: int, saved: dict, current: dict) -> int:
    """Micro-batches consumed in the current epoch, recounted for the current global micro-batch size.

    A checkpoint counts its position in global micro-batches of ``batch_size x num_processes``
    sequences; a run resumed with another layout (same global batch, see
    ``checkpoint.check_resume_compatible``) counts in its own. Checkpoints fall on optimizer steps,
    i.e. on whole global batches, which both sizes divide.

    Raises:
        ValueError: the position does not fall on a whole micro-batch of the new size.
    """
    if "batch_size" not in saved:  # a fingerprint from before layouts could change
        return consumed
    old = saved["batch_size"] * saved.get("num_processes", 1)
    new = current.get("batch_size", 1) * current.get("num_processes", 1)
    if consumed * old % new:
        raise ValueError(f"cannot continue {consumed} micro-batches of {old} sequences with micro-batches of {new}")
    return consumed * old // new


def pad_to_equal_batches(examples: list[dict], batch_size: int, num_batches: int, template: dict) -> list[dict]:
    """Extend a process's share of examples to ``num_batches * batch_size`` with examples that score nothing.

    The filler has the first tokens of ``template`` and every label -100: it runs through the model (so
    each process takes part in the same collectives) but adds neither loss nor label tokens.

    Args:
        examples: this process's examples (``input_ids``, ``labels``), possibly none.
        num_batches: the largest batch count over all processes.
        template: any example (tokenized like the others).
    """
    target = num_batches * batch_size
    if len(examples) >= target:
        return examples
    ids = list(template["input_ids"][:8])
    filler = {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)}
    return examples + [filler] * (target - len(examples))


def all_reduce_grads(params: list[nn.Parameter], bucket_elements: int = 1 << 24) -> None:
    """Average the gradients of replicated parameters over all processes, as DDP does (in place).

    Gradients travel in fp32 buckets of about ``bucket_elements`` values: few collectives, and a
    bounded extra buffer (64 MB) instead of a second copy of every gradient.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.get_world_size()
    while grads:
        bucket, size = [], 0
        while grads and (not bucket or size + grads[0].numel() <= bucket_elements):
            bucket.append(grads.pop(0))
            size += bucket[-1].numel()
        flat = torch.cat([g.reshape(-1).float() for g in bucket])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def store_4bit_as(model: nn.Module, dtype: torch.dtype) -> int:
    """Re-type the packed 4-bit data of every bitsandbytes ``Linear4bit`` as ``dtype`` (a view, no copy).

    FSDP shards and gathers parameters as flat tensors of one float dtype; bitsandbytes stores 4-bit
    weights as uint8. The same bytes viewed as ``dtype`` (bitsandbytes' ``quant_storage``, as in
    FSDP-QLoRA) shard like any other weight. The layer keeps its quant state on the module too, from
    where bitsandbytes restores it after FSDP replaced the parameter object.

    Returns:
        The number of layers re-typed.

    Raises:
        ValueError: a layer whose packed size is not a multiple of ``dtype``'s size.
    """
    count = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, bnb.nn.Linear4bit) or not isinstance(weight, bnb.nn.Params4bit):
            continue
        data = weight.data
        if data.dtype != dtype:
            if data.numel() * data.element_size() % dtype.itemsize:
                raise ValueError(f"{name}: {data.numel()} packed bytes cannot be stored as {dtype}")
            data = data.reshape(-1).view(torch.uint8).view(dtype).reshape(-1, 1)  # bitsandbytes' (n, 1) shape
        module.weight = bnb.nn.Params4bit(
            data, requires_grad=False, quant_state=weight.quant_state, quant_type=weight.quant_type,
            compress_statistics=weight.compress_statistics, blocksize=weight.blocksize, bnb_quantized=True,
            module=module, quant_storage=dtype)
        module.quant_storage, module.quant_state = dtype, weight.quant_state
        count += 1
    return count


def base_bytes(model: nn.Module, exclude: set[nn.Parameter]) -> tuple[int, int]:
    """``(bytes this process holds, bytes of the whole tensors)`` over the parameters not in ``exclude``."""
    local = total = 0
    for p in model.parameters():
        if p in exclude:
            continue
        size = p.element_size()
        total += p.numel() * size
        local += (p.to_local() if hasattr(p, "to_local") else p).numel() * size
    return local, total


def shard_frozen_base(model: nn.Module, accelerator, trainable: list[nn.Parameter]) -> nn.Module:
    """Shard the frozen base over all processes with FSDP (torch ``fully_shard``); keep ``trainable`` whole.

    Each decoder block is one FSDP unit: its full weights exist only while it computes (forward, and
    the recomputation of gradient checkpointing). The LoRA weights stay replicated and outside FSDP,
    so the optimizer, checkpoints and the saved adapter see ordinary tensors; call
    ``all_reduce_grads(trainable)`` after the backward passes of a step.

    Args:
        model: the quantized base with LoRA layers, on the CPU (it is moved block by block, so a
            process never holds more than its shard plus one block on the device).
        accelerator: the run's ``accelerate.Accelerator`` (device, process group, mixed precision).
        trainable: the LoRA parameters (the optimizer's).

    Returns:
        The same model object, sharded; its forward runs under the accelerator's autocast.
    """
    device = accelerator.device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    store_4bit_as(model, dtype)
    for module in model.modules():  # bitsandbytes reads the quant state from the module under FSDP
        if getattr(module, "quant_state", None) is not None and hasattr(module.quant_state, "to"):
            module.quant_state.to(device)
    keep = set(trainable)
    for p in trainable:  # FSDP leaves ignored parameters alone: move them, and start all processes alike
        p.data = p.data.to(device)
        torch.distributed.broadcast(p.data, src=0)
    mesh = init_device_mesh(device.type, (accelerator.num_processes,))
    try:
        _, blocks = decoder_blocks(model)
    except ModelLoadError as e:
        raise LaunchError(f"--fsdp: {e}; train it without --fsdp") from None
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=keep & set(block.parameters()))
    fully_shard(model, mesh=mesh, ignored_params=keep)
    local, total = base_bytes(model, keep)
    log.info("FSDP: this process holds %.1f%% of the %.1f MB frozen base (%d processes)", 100 * local / total,
             total / 1e6, accelerator.num_processes)
    if accelerator.mixed_precision != "no":  # what accelerator.prepare would add around forward
        forward = model.forward

        @functools.wraps(forward)
        def autocast_forward(*args, **kwargs):
            with accelerator.autocast():
                return forward(*args, **kwargs)

        model.forward = autocast_forward
    return model
