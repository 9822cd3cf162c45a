"""The training loop shared by `zephyr sft` and `zephyr dpo`, on accelerate.

Phases, in the order a step runs them (`TrainingLoop`, one method each): batch -> objective (forward, loss,
metrics) -> backward and accumulation -> clip, optimizer and scheduler step -> log -> periodic eval -> checkpoint.
The objective is the only stage-specific part, and the loop reads no batch keys: `objective(model, batch) ->
StepOutput` reports the loss, the metrics (already reduced across processes, averaged over the micro-batches of a
logging window exactly as TRL's trainers average `_metrics`) and its own example and token counts.

Step, learning-rate and epoch bookkeeping follow transformers' Trainer, so that logs line up with TRL's:
- update steps per epoch = ceil(batches / gradient_accumulation_steps); total = max_steps or epochs x that;
- warmup = warmup_steps, else ceil(warmup_ratio x total);
- the logged `learning_rate` is the rate the step used; `grad_norm` is the norm before clipping;
- `loss` is the mean over the steps since the last log of each step's loss: the mean of its micro-batch losses,
  or, for an objective that sets `normalize_over_window` (SFT), its labelled-token sum over the token count of the
  whole accumulation window on all processes -- Trainer's `num_items_in_batch`, so that gradient accumulation and
  data parallelism give the gradient of one big batch instead of a mean of per-micro-batch means.
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from zephyr.errors import ZephyrError
from zephyr.train.checkpoint import (
    TrainerState,
    fault_point,
    latest_checkpoint,
    remove_partial_checkpoints,
    resume,
    run_fingerprint,
    save_checkpoint,
)
from zephyr.train.optimizers import build_optimizer


class StepOutput(NamedTuple):
    """What an objective reports for one micro-batch on this process.

    loss:         [] the loss to backpropagate: the micro-batch's mean (over pairs for DPO, labelled tokens for SFT).
    metrics:      TRL-named metrics of the micro-batch, already reduced over processes.
    num_rows:     examples in the micro-batch here (pairs, or sequences); eval_loss is weighted by them.
    num_tokens:   [] tokens here that are not padding (TRL's `num_tokens`), on the batch's device.
    loss_tokens:  the labelled tokens `loss` is a mean over, for a loss normalised over the accumulation window.
    """

    loss: torch.Tensor
    metrics: dict[str, float]
    num_rows: int
    num_tokens: torch.Tensor
    loss_tokens: float | None = None


Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], StepOutput]


@dataclass
class TrainResult:
    model: torch.nn.Module  # as prepared by accelerate (wrapped for DDP / FSDP); save with save_final
    state: TrainerState
    output_dir: Path
    stopped_early: bool  # True when a signal asked the run to stop; a checkpoint holds where it was


class _StopRequest:
    """SIGTERM / SIGINT (a scheduler about to preempt the job) -> checkpoint at the next step boundary, then exit."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def total_update_steps(cfg, batches_per_epoch: int) -> tuple[int, int]:
    """(update steps per epoch, total update steps), as transformers' Trainer counts them."""
    per_epoch = max(math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps), 1)
    if cfg.max_steps and cfg.max_steps > 0:
        return per_epoch, cfg.max_steps
    return per_epoch, math.ceil(cfg.num_train_epochs * per_epoch)


def every(value: int | float | None, total: int) -> int | None:
    """An interval in steps from a recipe's `*_steps` key: below 1 it is a fraction of the run, as in Trainer."""
    if not value:
        return None
    return max(math.ceil(value * total), 1) if value < 1 else int(value)


def epoch_order(n: int, epoch: int, seed: int, strategy: str) -> list[int]:
    """The row order of one epoch: a seeded permutation (seed + epoch), so a resumed run sees the same order."""
    if strategy == "sequential":
        return list(range(n))
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


class MetricsLog:
    """One JSON line per log event in OUTPUT_DIR/metrics.jsonl (main process), plus accelerate trackers."""

    def __init__(self, accelerator, output_dir: Path, report_to: list[str]):
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"
        self.trackers = bool(report_to)

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.trackers:
            step = record.get("step")
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=step)


def _diverged(what: str, value: torch.Tensor, step: int, output_dir: Path) -> None:
    last = latest_checkpoint(output_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise ZephyrError(
        f"the {what} became {value.detach().float().flatten()[0].item()} at step {step}; {kept}. Lower the "
        "learning_rate, check max_grad_norm, or use bf16 instead of fp16"
    )


def _mean_metrics(window: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in window.items() if v}


def evaluate(accelerator, model, objective: Objective, dataloader: DataLoader) -> dict[str, float]:
    """Eval metrics with TRL's reductions: `eval_loss` weighted by the examples of each batch (Trainer's evaluation
    loop), the objective's metrics averaged over batches (TRL's `_metrics`)."""
    was_training = model.training
    model.eval()
    window: dict[str, list[float]] = defaultdict(list)
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for batch in dataloader:
            out = objective(model, batch)
            losses = accelerator.gather_for_metrics(out.loss.detach().float().reshape(1).repeat(out.num_rows))
            loss_sum += losses.sum().item()
            count += losses.numel()
            for k, v in out.metrics.items():
                window[k].append(v)
    model.train(was_training)
    return {
        "eval_loss": loss_sum / max(count, 1),
        **{f"eval_{k}": v for k, v in _mean_metrics(window).items()},
    }


def _window_normalization(accelerator, normalize_over_window: bool, cfg) -> tuple[bool, bool]:
    """(normalise the loss over the accumulation window's tokens?, by dividing before backward?).

    The gradients are normally divided by the window's token count at the step, once every micro-batch has counted
    its tokens. DeepSpeed keeps the gradients inside its engine, out of reach: with one micro-batch per step the count
    is known before backward and divides the loss instead (the same gradient); with more, the loss is the mean of
    the micro-batches' token means, and the run says so."""
    if not normalize_over_window:
        return False, False
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return True, False
    if cfg.gradient_accumulation_steps == 1:
        return True, True
    accelerator.print(
        "note: under DeepSpeed with gradient_accumulation_steps > 1 the loss is the mean of each micro-batch's "
        "token mean, not one mean over the tokens of the whole step (DeepSpeed holds the gradients)"
    )
    return False, False


def _scale_gradients(model: torch.nn.Module, factor: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def train(
    cfg,
    *,
    accelerator,
    model: torch.nn.Module,
    objective: Objective,
    train_dataset,
    collate: Callable,
    eval_dataset=None,
    eval_collate: Callable | None = None,
    on_save: Callable[[Path], None] | None = None,
    progress: bool = True,
    data_identity: str | None = None,
    normalize_over_window: bool = False,
) -> TrainResult:
    """Train MODEL with OBJECTIVE on TRAIN_DATASET; checkpoints and logs under cfg.output_dir.

    The model is prepared here (DDP / FSDP / DeepSpeed as the accelerate config says). Resumes from
    `cfg.resume_from_checkpoint` (true = the latest complete checkpoint in output_dir) when the checkpoint's
    fingerprint is this run's; DATA_IDENTITY (the tokenized training data's content fingerprint) is part of it.
    NORMALIZE_OVER_WINDOW: the objective's loss is a mean over `loss_tokens` labelled tokens, to be averaged over the
    tokens of the whole accumulation window on all processes instead (SFT).
    """
    loop = TrainingLoop(cfg, accelerator, objective, train_dataset, collate, on_save, normalize_over_window)
    model = loop.prepare(model)
    loop.eval_loader = loop.eval_dataloader(eval_dataset, eval_collate or collate)
    loop.state = resume(accelerator, cfg, run_fingerprint(cfg, accelerator, data_identity), loop.max_steps)
    loop.replay_schedule()
    loop.open_logs(progress)
    with _StopRequest() as stop:
        loop.run(model, stop)
    loop.close(model)
    return TrainResult(
        model=model, state=loop.state, output_dir=loop.output_dir, stopped_early=loop.stopped_early
    )


class TrainingLoop:
    """The state one run of `train` carries between its phases: the schedule, the optimizer, the logs and the
    sums of the current optimizer step and logging window. Each method is one phase."""

    def __init__(self, cfg, accelerator, objective, train_dataset, collate, on_save, normalize_over_window):
        self.cfg, self.accelerator, self.objective = cfg, accelerator, objective
        self.train_dataset, self.collate, self.on_save = train_dataset, collate, on_save
        self.output_dir = Path(cfg.output_dir)
        batches = math.ceil(
            len(train_dataset) / (cfg.per_device_train_batch_size * accelerator.num_processes)
        )
        _, self.max_steps = total_update_steps(cfg, batches)
        self.windowed, self.divide_before_backward = _window_normalization(
            accelerator, normalize_over_window, cfg
        )
        self.eval_loader: DataLoader | None = None
        self.state = TrainerState(max_steps=self.max_steps)
        self.stopped_early = False
        self.window: dict[str, list[float]] = defaultdict(
            list
        )  # metrics of the micro-batches since the last log
        self.window_losses: list[float] = []  # one per optimizer step since the last log
        self.micro_losses: list[float] = []  # the current step's micro-batches
        self.step_nll, self.step_items = 0.0, 0.0  # the current step's labelled-token loss sum and count
        self.window_tokens, self.window_start = 0, time.perf_counter()
        self.grad_norm, self.step_lr = None, None

    # ---- setup

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The optimizer and scheduler, and the model prepared by accelerate (DDP, FSDP, DeepSpeed)."""
        cfg, accelerator = self.cfg, self.accelerator
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(self.output_dir)
        accelerator.wait_for_everyone()
        optimizer = build_optimizer(model, cfg)
        self.scheduler = get_scheduler(
            cfg.lr_scheduler_type,
            optimizer,
            num_warmup_steps=cfg.num_warmup_steps(self.max_steps),
            num_training_steps=self.max_steps,
            scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or None,
        )
        # The scheduler stays outside `prepare`: accelerate would step it once per process per optimizer step (it
        # assumes a schedule sized per process), which decays the rate N times too fast for our global step counts.
        # Nor is it checkpointed: accelerate would pickle it (and unpickle it with weights_only=False on resume, so
        # a checkpoint from elsewhere could run code). Its rate is a function of the step alone: resuming replays.
        model, self.optimizer = accelerator.prepare(model, optimizer)
        if getattr(cfg, "gradient_checkpointing", False):
            accelerator.unwrap_model(model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs or {"use_reentrant": False}
            )
        return model

    def train_dataloader(self, epoch: int) -> DataLoader:
        cfg = self.cfg
        seed = cfg.data_seed if cfg.data_seed is not None else cfg.seed
        order = epoch_order(len(self.train_dataset), epoch, seed, cfg.train_sampling_strategy)
        loader = DataLoader(
            torch.utils.data.Subset(self.train_dataset, order),
            batch_size=cfg.per_device_train_batch_size,
            shuffle=False,
            collate_fn=self.collate,
            num_workers=cfg.dataloader_num_workers or 0,
            drop_last=bool(cfg.dataloader_drop_last),
        )
        return self.accelerator.prepare_data_loader(loader, device_placement=True)

    def eval_dataloader(self, dataset, collate: Callable) -> DataLoader | None:
        if dataset is None or not len(dataset):
            return None
        loader = DataLoader(
            dataset, batch_size=self.cfg.per_device_eval_batch_size, shuffle=False, collate_fn=collate
        )
        return self.accelerator.prepare_data_loader(loader)

    def replay_schedule(self) -> None:
        with (
            warnings.catch_warnings()
        ):  # "scheduler.step() before optimizer.step()": intended, it is a replay
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.state.global_step):
                self.scheduler.step()

    def open_logs(self, progress: bool) -> None:
        cfg, steps = self.cfg, self.max_steps
        self.log = MetricsLog(self.accelerator, self.output_dir, cfg.report_to or [])
        if self.accelerator.is_main_process:
            self.log.truncate_after(self.state.global_step)  # records of steps the resumed run will redo
        self.eval_every = None
        if cfg.eval_strategy == "steps" and self.eval_loader is not None:
            self.eval_every = every(
                cfg.eval_steps if cfg.eval_steps is not None else cfg.logging_steps, steps
            )
        self.save_every = every(cfg.save_steps, steps) if cfg.save_strategy == "steps" else None
        self.logging_steps = every(cfg.logging_steps, steps) or 1
        self.bar = None
        if progress and self.accelerator.is_main_process:
            self.bar = tqdm(
                total=steps, initial=self.state.global_step, desc=cfg.stage, unit="step", dynamic_ncols=True
            )

    # ---- the loop

    def run(self, model: torch.nn.Module, stop: _StopRequest) -> None:
        """Epochs until max_steps, or until a signal asks the run to stop (after checkpointing)."""
        state = self.state
        model.train()
        while state.global_step < self.max_steps:
            loader = self.train_dataloader(state.epoch)
            batches = (
                self.accelerator.skip_first_batches(loader, state.batches_in_epoch)
                if state.batches_in_epoch
                else loader
            )
            for batch in batches:
                self.micro_step(model, batch)
                if not self.accelerator.sync_gradients:
                    continue
                if not self.after_optimizer_step(model, stop, len(loader)):
                    break
            if self.stopped_early:
                return
            self.end_of_epoch(model, epoch_done=state.batches_in_epoch >= len(loader))
            if state.global_step >= self.max_steps:
                return
            state.epoch += 1
            state.batches_in_epoch = 0
            if self.cfg.save_strategy == "epoch":
                self.checkpoint()

    def micro_step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Forward and backward of one micro-batch; at the end of an accumulation window, the optimizer step."""
        accelerator, state = self.accelerator, self.state
        with accelerator.accumulate(model):
            out = self.objective(model, batch)
            if not torch.isfinite(out.loss.detach()).all():
                _diverged("loss", out.loss, state.global_step + 1, self.output_dir)
            self.backward(out)
            self.grad_norm = None
            if accelerator.sync_gradients:
                self.optimizer_step(model)
        state.batches_in_epoch += 1
        tokens = int(accelerator.gather(torch.as_tensor(out.num_tokens).reshape(1)).sum())
        state.total_tokens += tokens
        self.window_tokens += tokens
        for k, v in out.metrics.items():
            self.window[k].append(v)

    def backward(self, out: StepOutput) -> None:
        accelerator, loss = self.accelerator, out.loss
        if not self.windowed:
            accelerator.backward(loss)
            self.micro_losses.append(accelerator.gather(loss.detach().float().reshape(1)).mean().item())
            return
        items = out.loss_tokens
        sums = accelerator.gather(torch.stack([loss.detach().float() * items, loss.new_tensor(items)]))
        self.step_nll += float(sums.reshape(-1, 2)[:, 0].sum())
        self.step_items += float(sums.reshape(-1, 2)[:, 1].sum())
        if self.divide_before_backward:  # the window is this micro-batch: its token count is known
            accelerator.backward(loss * items * accelerator.num_processes / max(self.step_items, 1.0))
        else:
            # Backpropagate the token sum (accelerate divides by the accumulation steps: undone here); the gradients
            # are divided by the window's token count at the step.
            accelerator.backward(loss * items * accelerator.gradient_accumulation_steps)

    def optimizer_step(self, model: torch.nn.Module) -> None:
        """Clip (logging the norm before clipping), step the optimizer and the schedule, zero the gradients."""
        cfg, accelerator, step = self.cfg, self.accelerator, self.state.global_step + 1
        fault_point(f"step:{step}")
        if (
            self.windowed and not self.divide_before_backward
        ):  # DDP averaged over processes: count all of them
            _scale_gradients(model, accelerator.num_processes / max(self.step_items, 1.0))
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            self.grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if self.grad_norm is not None and not torch.isfinite(torch.as_tensor(self.grad_norm)).all():
                _diverged("gradient norm", self.grad_norm, step, self.output_dir)
        self.step_lr = self.scheduler.get_last_lr()[0]  # the rate this step used, as Trainer logs it
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def after_optimizer_step(
        self, model: torch.nn.Module, stop: _StopRequest, batches_per_epoch: int
    ) -> bool:
        """Log, evaluate and checkpoint on their schedules; False when the run should leave the epoch."""
        if self.windowed:
            self.window_losses.append(self.step_nll / max(self.step_items, 1.0))
            self.step_nll, self.step_items = 0.0, 0.0
        else:
            self.window_losses.append(sum(self.micro_losses) / len(self.micro_losses))
            self.micro_losses.clear()
        self.state.global_step += 1
        step = self.state.global_step
        if step % self.logging_steps == 0 or step == self.max_steps:
            self.log_window(batches_per_epoch)
        if self.bar is not None:
            self.bar.update(1)
        if self.eval_every and step % self.eval_every == 0:
            self.record({"step": step, **evaluate(self.accelerator, model, self.objective, self.eval_loader)})
        if stop.requested:
            self.checkpoint()
            self.stopped_early = True
            return False
        if self.save_every and step % self.save_every == 0 and step < self.max_steps:
            self.checkpoint()
        return step < self.max_steps

    def log_window(self, batches_per_epoch: int) -> None:
        """One metrics record for the steps since the last log, as TRL's trainers log them."""
        state = self.state
        elapsed = time.perf_counter() - self.window_start
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch + state.batches_in_epoch / max(batches_per_epoch, 1), 4),
            "loss": sum(self.window_losses) / len(self.window_losses),
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
            "learning_rate": self.step_lr,
            **_mean_metrics(self.window),
            "num_tokens": state.total_tokens,
            "tokens_per_second": self.window_tokens / max(elapsed, 1e-9),
        }
        self.record(record)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['learning_rate']:.2e}",
                tok_s=f"{record['tokens_per_second']:.0f}",
            )
        self.window.clear()
        self.window_losses.clear()
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def end_of_epoch(self, model: torch.nn.Module, *, epoch_done: bool) -> None:
        """The eval of `eval_strategy: epoch` (the last epoch included, even when max_steps ends it exactly there)."""
        if epoch_done and self.cfg.eval_strategy == "epoch" and self.eval_loader is not None:
            metrics = evaluate(self.accelerator, model, self.objective, self.eval_loader)
            self.record({"step": self.state.global_step, "epoch": self.state.epoch + 1, **metrics})

    def close(self, model: torch.nn.Module) -> None:
        """A last eval unless the run's final step was just evaluated, or a signal stopped it."""
        if self.bar is not None:
            self.bar.close()
        if self.stopped_early or self.eval_loader is None or self.cfg.eval_strategy == "no":
            return
        last = self.state.log_history[-1] if self.state.log_history else {}
        if "eval_loss" not in last or last.get("step") != self.state.global_step:
            metrics = evaluate(self.accelerator, model, self.objective, self.eval_loader)
            self.record({"step": self.state.global_step, **metrics})

    def record(self, record: dict[str, Any]) -> None:
        self.state.log_history.append(record)
        self.log.write(record)

    def checkpoint(self) -> None:
        path = save_checkpoint(self.accelerator, self.state, self.output_dir, self.cfg.save_total_limit)
        if self.on_save is not None:
            self.on_save(path)
