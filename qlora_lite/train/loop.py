"""The training loop on accelerate: data -> model -> steps (eval, checkpoints, metrics) -> adapter.

Reading order: ``train`` (the entry point) prepares everything, ``_Loop`` runs the optimizer steps.
Data order is a pure function of (seed, epoch) and dropout masks of (seed, step, process), so a
resumed run replays exactly the batches and masks the uninterrupted run would have seen; with the
restored adapter, optimizer and scheduler its losses equal the uninterrupted ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from qlora_lite.checkpoint.folder import (
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from qlora_lite.checkpoint.resume import (
    TRACKING_DIR,
    check_resume_compatible,
    guard_output_dir,
)
from qlora_lite.checkpoint.run_folder import RunLock, mark_run
from qlora_lite.config import Config
from qlora_lite.data.packing import collate
from qlora_lite.errors import MetricsError, TrainingError
from qlora_lite.model.adapter import save_adapter
from qlora_lite.model.folder import load_tokenizer, resolve_model_dir
from qlora_lite.model.loss import batch_loss_sum, eval_sums, label_tokens
from qlora_lite.model.preference import chosen_tokens, metrics_from_sums, preference_eval
from qlora_lite.storage.output_dir import check_writable, write_failure
from qlora_lite.train.batches import epoch_batches, load_training_data, plan_steps
from qlora_lite.train.distributed import (
    all_reduce_grads,
    check_same_checkpoint,
    pad_to_equal_batches,
    rescale_position,
    shard_frozen_base,
)
from qlora_lite.train.metrics import METRICS_NAME, MetricsLog, peak_memory_bytes, plot_loss
from qlora_lite.train.model_setup import build_model_from_config, resolve_precision, run_fingerprint
from qlora_lite.train.optim import apply_current_settings, build_optimizer, build_scheduler, lora_plus_groups
from qlora_lite.train.preference import (
    N_SUMS,
    attach_start_reference,
    micro_batch_loss,
    objective_for,
    write_reference,
)
from qlora_lite.train.tracking import finish_trackers, log_record, requested_trackers, start_trackers

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced. ``eval_metrics`` is empty when there is no eval set."""

    output_dir: Path
    adapter_dir: Path | None
    metrics_path: Path
    plot_path: Path | None
    steps: int
    eval_metrics: dict[str, float] = field(default_factory=dict)
    train_loss: float | None = None
    resumed_from: Path | None = None
    main_process: bool = True  # False in the other processes of a multi-process launch (they write nothing)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


OOM_ADVICE = ("out of memory during training ({}). Lower --batch-size (raise --grad-accum to keep the "
              "effective batch), lower --max-seq-len or --rank, or enable --gradient-checkpointing.")


def train(config: Config) -> TrainResult:
    """Fine-tune a LoRA adapter as ``config`` says; the adapter lands at the top of ``config.train.output``.

    Raises:
        errors.ConfigError, errors.DataError, errors.ModelLoadError, errors.CheckpointError,
        TrainingError: with a message meant for the user.
    """
    config.validate(required=("model.model", "data.data", "train.output"))
    t = config.train
    trackers = requested_trackers(t.report_to)
    output_dir = Path(t.output)
    resume_from = latest_checkpoint(output_dir) if t.resume else None
    saved_state = read_trainer_state(resume_from) if resume_from is not None else None
    resolve_precision(config, saved_state)
    mixed = {"bf16": "bf16", "fp16": "fp16" if torch.cuda.is_available() else "no"}.get(config.model.compute_dtype, "no")
    if mixed == "fp16" and config.lora.lora_dtype != "fp32":
        # fp16 training needs a gradient scaler, and the scaler refuses 16-bit master weights.
        log.warning("--compute-dtype fp16 trains the adapter with fp32 weights (--lora-dtype fp32)")
        config.lora.lora_dtype = "fp32"
    # accelerate keeps one precision per process; a run before this one in the same process (a test,
    # the demo) may have set another, which Accelerator() would refuse.
    AcceleratorState._reset_state()
    # cpu=True without CUDA: lets `accelerate launch`/torchrun start several CPU processes (gloo).
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(), log_with=trackers or None,
                              project_dir=str(output_dir / TRACKING_DIR))
    if not accelerator.is_main_process:
        logging.getLogger("qlora_lite").setLevel(logging.WARNING)  # one process reports progress
    model_dir = resolve_model_dir(config.model.model)
    guard_output_dir(output_dir, model_dir, t.resume, config.lora.adapter)
    check_writable(output_dir)  # now, not after minutes of loading
    lock = RunLock(output_dir)
    if accelerator.is_main_process and output_dir.is_dir():  # refuse a second run before loading anything
        lock.acquire()
    try:
        return _train(config, accelerator, output_dir, model_dir, lock, resume_from, saved_state, trackers)
    finally:
        finish_trackers(accelerator)
        lock.release()


def _train(config: Config, accelerator, output_dir: Path, model_dir: Path, lock, resume_from: Path | None,
           saved_state: dict | None, trackers: list[str]) -> TrainResult:
    """``train`` once the output folder is checked (and locked, if it exists); ``resume_from`` is the
    checkpoint to continue (None: from step 0) and ``saved_state`` its trainer state; ``trackers``
    the --report-to names the accelerator was built with."""

    t = config.train
    tokenizer = load_tokenizer(model_dir, config.model.trust_remote_code)
    train_examples, eval_examples = load_training_data(config, tokenizer)

    # Examples per epoch: another process count may resume only if it drops no other example.
    used = sum(map(len, epoch_batches(len(train_examples), t.batch_size, t.seed, 0, accelerator.num_processes)))
    fingerprint = run_fingerprint(config, accelerator.num_processes, examples_per_epoch=used)
    if t.resume and resume_from is None:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", output_dir)
    if accelerator.num_processes > 1:  # all processes continue from one checkpoint (machines share --output)

        check_same_checkpoint(accelerator, resume_from, output_dir)
    if resume_from is not None:  # refuse an incompatible resume before the model is loaded
        for warning in check_resume_compatible(saved_state, fingerprint):
            log.warning("resume: %s", warning)
    set_seed(t.seed)
    loop = _Loop(config, accelerator, train_examples, eval_examples, tokenizer.pad_token_id, fingerprint)
    try:
        loop.setup(resume_from)
        # Nothing is written before every process has checked --output and built its model, so a
        # run that fails to start (bad --target-modules, no memory) leaves no folder to --resume.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()  # a no-op when taken above; a run started meanwhile on a new folder is refused here
            guard_output_dir(output_dir, model_dir, t.resume, config.lora.adapter)  # nothing appeared meanwhile
            mark_run(output_dir)
            config.save(output_dir / "config.yaml")
            mark_run(output_dir, ("config.yaml",))
            write_reference(output_dir, loop.reference)
        start_trackers(accelerator, config, trackers, loop.step)
        return loop.run()
    except Exception as e:
        if is_out_of_memory(e):
            raise TrainingError(OOM_ADVICE.format(str(e).splitlines()[0][:200])) from e
        raise


class _Loop:
    """The optimizer steps of one run with evaluation, checkpoints and metrics; every process runs it.

    Only the main process writes files; losses and eval sums are reduced over processes.
    """

    def __init__(self, config: Config, accelerator, train_examples: list[dict], eval_examples: list[dict],
                 pad_token_id: int, fingerprint: dict):
        self.config, self.t, self.acc = config, config.train, accelerator
        self.train_examples, self.eval_examples = train_examples, eval_examples
        self.pad_token_id, self.fingerprint = pad_token_id, fingerprint
        self.output_dir = Path(config.train.output)
        self.chunks: tuple[int, list[list[int]]] = (0, self._epoch_chunks(0))
        if not self.chunks[1]:
            raise TrainingError(f"{config.data.data}: {len(train_examples)} training example(s) cannot fill one batch "
                                f"for {accelerator.num_processes} processes")
        self.steps_per_epoch, self.total_steps = plan_steps(len(self.chunks[1]), self.t.grad_accum,
                                                            self.t.max_steps, self.t.epochs)
        self.step = self.epoch = self.consumed = 0
        self.metrics = MetricsLog(self.output_dir / METRICS_NAME, enabled=accelerator.is_main_process)
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.last_eval: dict[str, float] = {}
        self.last_loss: float | None = None
        self.objective = objective_for(config)  # None: SFT
        self.reference: dict | None = None  # start-adapter reference log-probs still to write
        if self.t.eval_steps and not eval_examples:
            log.warning("--eval-steps %d does nothing without --eval-data or --eval-fraction", self.t.eval_steps)

    def _epoch_chunks(self, epoch: int) -> list[list[int]]:
        return epoch_batches(len(self.train_examples), self.t.batch_size, self.t.seed, epoch, self.acc.num_processes)

    def setup(self, resume_from: Path | None) -> None:
        """Build model, optimizer and schedule; restore them (and the RNG) from ``resume_from`` if given."""
        t = self.t
        model = build_model_from_config(self.config, trainable=True)
        if self.objective is not None and self.objective.needs_reference and self.config.lora.adapter:
            # The start adapter is the reference: scored now, before a checkpoint's weights replace it.
            self.reference = attach_start_reference(
                model, self.acc, self.output_dir, {"train": self.train_examples, "eval": self.eval_examples},
                t.batch_size, self.pad_token_id, resume_from is not None)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in trainable]
        optimizer = build_optimizer(lora_plus_groups(trainable, t.lora_plus_ratio), t.optimizer, t.lr,
                                    t.weight_decay, self.acc.device.type)
        # The schedule always spans the planned total, so a resumed run gets the same learning rates.
        self.scheduler = build_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, self.total_steps)
        if resume_from is not None:
            # fp16: the loss scale continues too, or the resumed run would skip steps while it backs off again.
            state = load_checkpoint(resume_from, model, optimizer, self.scheduler, self.acc.scaler)
            apply_current_settings(optimizer, self.scheduler, t.lr, t.weight_decay)  # a changed --lr takes effect
            self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["batches_consumed"]
            if "fingerprint" in state:  # micro-batches of another size when the process layout changed

                self.consumed = rescale_position(self.consumed, state["fingerprint"], self.fingerprint)
            self.resumed_from = self.last_checkpoint = Path(resume_from)
            self.last_loss = state.get("loss")
            self.last_eval = {k: v for k, v in state.items() if k.startswith("eval_")}
            self.metrics.truncate_after(self.step)
            log.info("resuming from %s at step %d (epoch %d, %d batches in)", resume_from, self.step, self.epoch,
                     self.consumed)
        else:
            self.metrics.reset()
        n_params = sum(p.numel() for p in self.params)
        log.info("training %d LoRA parameters for %d steps (%d per epoch) on %s", n_params, self.total_steps,
                 self.steps_per_epoch, self.acc.device)
        self.sharded = t.fsdp and self.acc.num_processes > 1
        if self.sharded:  # FSDP: the frozen base sharded over the processes, LoRA whole on each

            self.model, self.optimizer = shard_frozen_base(model, self.acc, self.params), self.acc.prepare(optimizer)
        else:
            self.model, self.optimizer = self.acc.prepare(model, optimizer)

    def run(self) -> TrainResult:
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.acc.is_main_process)
        # Log lines go above the progress bar instead of through it.
        with bar, logging_redirect_tqdm(loggers=[logging.getLogger("qlora_lite")]):
            try:
                while self.step < self.total_steps:
                    self._next_step(bar)
            except KeyboardInterrupt:
                where = self.last_checkpoint or "none yet"
                log.warning("interrupted during step %d; last complete checkpoint: %s (continue with --resume)",
                            self.step + 1, where)
                raise
        return self._finish()

    def _next_step(self, bar) -> None:
        """One optimizer step on the next ``grad_accum`` micro-batches of the current epoch."""
        if self.chunks[0] != self.epoch:
            self.chunks = (self.epoch, self._epoch_chunks(self.epoch))
        chunks = self.chunks[1]
        window = chunks[self.consumed:self.consumed + self.t.grad_accum]
        record = self._optimizer_step(window)
        self.consumed += len(window)
        if self.consumed >= len(chunks):
            self.epoch, self.consumed = self.epoch + 1, 0
        record["epoch"] = round(self.epoch + self.consumed / len(chunks), 4)
        self._after_step(record, bar)

    def _optimizer_step(self, window: list[list[int]]) -> dict:
        """Forward/backward over the micro-batches of ``window``, clip, step. Returns the metrics record.

        The loss is normalized by the label tokens of the whole window (all processes), so gradient
        accumulation and several processes give the same update as one large batch.
        """
        acc, examples, objective = self.acc, self.train_examples, self.objective
        rank, procs = acc.process_index, acc.num_processes
        in_window = [examples[i] for chunk in window for i in chunk]
        if objective is None:
            n_labels = max(1, sum(map(label_tokens, in_window)))
            n_tokens = sum(len(e["input_ids"]) for e in in_window)
        else:  # pairs: normalized by the pairs (and ORPO's chosen tokens) of the window
            n_labels, n_chosen = len(in_window), chosen_tokens(in_window)
            n_tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in in_window)
        lr = self.scheduler.get_last_lr()[0]
        started = time.perf_counter()
        # Dropout draws from a generator seeded per (seed, step, process): a resumed run, or any
        # process of a multi-process one, repeats exactly the masks of the uninterrupted run.
        torch.manual_seed((self.t.seed * 1_000_003 + self.step) * 1024 + rank)
        loss_sum = torch.zeros(() if objective is None else N_SUMS, device=acc.device)

        for k, chunk in enumerate(window):
            part = [examples[i] for i in chunk[rank::procs]]
            # Only the last micro-batch of the window synchronizes gradients across processes.
            sync = contextlib.nullcontext() if k == len(window) - 1 else acc.no_sync(self.model)
            with sync:
                if objective is None:
                    batch = {key: value.to(acc.device) for key, value in collate(part, self.pad_token_id).items()}
                    loss, _ = batch_loss_sum(self.model, batch)
                    sums, scale = loss.detach(), procs / n_labels
                else:
                    loss, sums = micro_batch_loss(self.model, part, objective, self.pad_token_id, acc.device,
                                                  n_labels, n_chosen)
                    scale = procs
                if not torch.isfinite(loss):
                    self._diverged(f"the loss is {float(loss.detach())}")
                acc.backward(loss * scale)
            loss_sum += sums
        max_norm = self.t.max_grad_norm if self.t.max_grad_norm > 0 else float("inf")
        if self.sharded:  # LoRA weights are replicated outside FSDP: average their gradients as DDP would

            all_reduce_grads(self.params)
        grad_norm = float(acc.clip_grad_norm_(self.params, max_norm))
        # With fp16 the gradient scaler skips overflowing steps itself (and lowers its scale).
        if not math.isfinite(grad_norm) and acc.scaler is None:
            self._diverged(f"the gradient norm is {grad_norm}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        reduced = acc.reduce(loss_sum, "sum")
        if objective is None:
            record = {"loss": float(reduced) / n_labels}
        else:  # loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies
            record = metrics_from_sums(reduced[:5], float(reduced[5]), n_chosen)
        self.last_loss = record["loss"]
        return {"step": self.step, **record, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": n_tokens / max(time.perf_counter() - started, 1e-9),
                "peak_mem_bytes": peak_memory_bytes(acc.device)}

    def _diverged(self, what: str) -> None:
        """Stop before the optimizer step, so no non-finite weight is ever saved."""
        self.optimizer.zero_grad(set_to_none=True)
        # str.capitalize() would lowercase the rest, the path included ("runs/MyRun" -> "runs/myrun")
        where = (f"The last good checkpoint is {self.last_checkpoint} (continue from it with --resume)"
                 if self.last_checkpoint else "No checkpoint was written yet")
        raise TrainingError(f"training diverged at step {self.step + 1}: {what}; stopped before updating the "
                            f"weights. {where}. Try a lower --lr, more --warmup-steps or "
                            "--max-grad-norm 1.0, and check the data.")

    def _after_step(self, record: dict, bar) -> None:
        t, last = self.t, self.step >= self.total_steps
        if self.eval_examples and ((t.eval_steps and self.step % t.eval_steps == 0) or last):
            self.last_eval = self._evaluate()
            record.update(self.last_eval)
            if self.objective is None:
                log.info("step %d: eval loss %.4f, perplexity %.2f", self.step, self.last_eval["eval_loss"],
                         self.last_eval["eval_ppl"])
            else:
                log.info("step %d: eval loss %.4f, reward accuracy %.1f%%, reward margin %.4f", self.step,
                         self.last_eval["eval_loss"], 100 * self.last_eval["eval_rewards/accuracies"],
                         self.last_eval["eval_rewards/margins"])
        if self.step % t.logging_steps == 0 or last or "eval_loss" in record:
            self.metrics.write(record)
            log_record(self.acc, record)
        extra = {} if self.objective is None else {"acc": f"{record['rewards/accuracies']:.2f}",
                                                   "margin": f"{record['rewards/margins']:.3f}"}
        bar.set_postfix(loss=f"{record['loss']:.4f}", **extra, lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
        if (t.save_steps and self.step % t.save_steps == 0) or last:
            self._save_checkpoint()

    def _evaluate(self) -> dict[str, float]:
        """Eval loss over all processes (each scores its own shard of the eval examples)."""
        acc = self.acc
        shard = self.eval_examples[acc.process_index::acc.num_processes]
        if self.objective is not None:
            return self._evaluate_pairs(shard)
        if acc.num_processes > 1:  # same number of forward passes everywhere, or collectives hang

            batches = math.ceil(math.ceil(len(self.eval_examples) / acc.num_processes) / self.t.batch_size)
            shard = pad_to_equal_batches(shard, self.t.batch_size, batches, self.eval_examples[0])
        total, count = eval_sums(self.model, shard, self.t.batch_size, self.pad_token_id, acc.device)
        sums = acc.reduce(torch.tensor([total, float(count)], dtype=torch.float64, device=acc.device), "sum")
        loss = float(sums[0]) / max(1.0, float(sums[1]))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0))}

    def _evaluate_pairs(self, shard: list[dict]) -> dict[str, float]:
        """Preference loss, rewards and accuracy on the eval pairs, summed over the processes."""
        acc = self.acc
        # Fillers (run, not counted) give every process the same number of forward passes (collectives).
        most = math.ceil(len(self.eval_examples) / acc.num_processes)
        filled = shard + [self.eval_examples[0]] * (most - len(shard))
        sums, nll, _ = preference_eval(self.model, filled, self.objective, self.t.batch_size, self.pad_token_id,
                                       acc.device, counted=len(shard))
        total = acc.reduce(torch.cat([sums, torch.tensor([nll], dtype=torch.float64)]).to(acc.device), "sum")
        return metrics_from_sums(total[:5], float(total[5]), chosen_tokens(self.eval_examples), prefix="eval_")

    def _save_checkpoint(self) -> None:
        state = {"step": self.step, "epoch": self.epoch, "batches_consumed": self.consumed,
                 "total_steps": self.total_steps, "fingerprint": self.fingerprint,
                 "loss": self.last_loss, **self.last_eval}
        if self.acc.is_main_process:
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # unwrap accelerate's wrapper
            self.last_checkpoint = save_checkpoint(self.output_dir, self.step, self.acc.unwrap_model(self.model),
                                                   optimizer, self.scheduler, state, self.t.save_total_limit,
                                                   scaler=self.acc.scaler)
        self.acc.wait_for_everyone()

    def _finish(self) -> TrainResult:
        result = TrainResult(self.output_dir, None, self.metrics.path, None, self.step, dict(self.last_eval),
                             self.last_loss, self.resumed_from, self.acc.is_main_process)
        if self.acc.is_main_process:
            try:
                result.adapter_dir = save_adapter(self.acc.unwrap_model(self.model), self.output_dir,
                                                  base_model_name=str(self.config.model.model))
            except OSError as e:  # the checkpoint of this last step is complete: nothing trained is lost

                saved = (f"the trained weights are safe in {self.last_checkpoint}; then run the same command with "
                         "--resume to write the adapter from it" if self.last_checkpoint else "nothing was saved")
                raise TrainingError(f"writing the adapter to {self.output_dir} failed: {write_failure(e)}; {saved}") \
                    from None
            mark_run(self.output_dir, ("adapter_config.json", "adapter_model.safetensors", "qlora_lite.json"))
            try:
                result.plot_path = plot_loss(self.output_dir)
            except MetricsError as e:  # a missing plot must not cost the trained adapter
                log.warning("no loss plot: %s", e)
        self.acc.wait_for_everyone()
        return result
