"""The training loop shared by `zephyr sft` and `zephyr dpo`, on accelerate.

Phases, in the order a step runs them: batch -> objective (forward, loss, metrics) -> backward and accumulation ->
clip, optimizer and scheduler step -> log -> periodic eval -> checkpoint. The objective is the only stage-specific
part: `objective(model, batch) -> (loss, metrics)`, where `metrics` are per-batch values already reduced across
processes, averaged over the micro-batches of a logging window exactly as TRL's trainers average `_metrics`.

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
from typing import Any

import torch
from torch.utils.data import DataLoader

from zephyr.config import config_to_dict
from zephyr.models import model_identity
from zephyr.train.checkpoint import (
    TrainerState,
    fault_point,
    remove_partial_checkpoints,
    resume_candidates,
    save_checkpoint,
)
from zephyr.train.optimizers import build_optimizer
from zephyr.train.run_folder import check_resume, fingerprint, recorded_fingerprint

Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


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


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens of a batch that are not padding (TRL's `num_tokens` counts the attention mask): packed batches carry
    no attention mask, so their padding is told apart by its label -100 and restarting positions at the end."""
    if "token_count" in batch:  # packed rows (SFT packing, DPO prefix sharing) say how many they hold
        return batch["token_count"].sum()
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)


def _diverged(what: str, value: torch.Tensor, step: int, output_dir: Path) -> None:
    from zephyr.errors import ZephyrError
    from zephyr.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(output_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise ZephyrError(
        f"the {what} became {value.detach().float().flatten()[0].item()} at step {step}; {kept}. Lower the "
        "learning_rate, check max_grad_norm, or use bf16 instead of fp16"
    )


def _mean_metrics(window: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in window.items() if v}


def evaluate(accelerator, model, objective: Objective, dataloader: DataLoader) -> dict[str, float]:
    """Eval metrics with TRL's reductions: `eval_loss` weighted by batch size (Trainer's evaluation loop), the
    objective's metrics averaged over batches (TRL's `_metrics`)."""
    was_training = model.training
    model.eval()
    window: dict[str, list[float]] = defaultdict(list)
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for batch in dataloader:
            loss, metrics = objective(model, batch)
            metrics.pop(
                "_items", None
            )  # eval loss is per batch, weighted by its size, as Trainer's eval loop
            if "completion_gather" in batch:  # one packed row of pairs: count the pairs
                n = batch["completion_gather"].shape[0] // 2
            elif "completion_mask" in batch:  # preference batches hold chosen and rejected rows
                n = batch["input_ids"].shape[0] // 2
            else:
                n = batch["input_ids"].shape[0]
            losses = accelerator.gather_for_metrics(loss.detach().float().reshape(1).repeat(n))
            loss_sum += losses.sum().item()
            count += losses.numel()
            for k, v in metrics.items():
                window[k].append(v)
    model.train(was_training)
    out = {"eval_loss": loss_sum / max(count, 1)}
    out.update({f"eval_{k}": v for k, v in _mean_metrics(window).items()})
    return out


def run_fingerprint(cfg, accelerator, data_identity: str | None) -> dict:
    """This run's fingerprint (`zephyr.train.run_folder.fingerprint`), kept in every checkpoint and the run record."""
    return fingerprint(
        config_to_dict(cfg),
        model=model_identity(cfg.model_name_or_path, cfg.model_revision),
        data=data_identity,
        num_processes=accelerator.num_processes,
    )


def resume(accelerator, cfg, fingerprint: dict, max_steps: int) -> TrainerState:
    """The state to start from: the newest checkpoint that loads (falling back to older ones when one cannot be
    read), or step 0 when resuming was not asked for, or asked for where no checkpoint exists yet. A checkpoint of
    another run (another fingerprint) is refused; so is a resume where checkpoints exist and none loads. A load
    that fails part-way is followed by a complete load of an older checkpoint, or by the error: training never
    continues from a half-loaded state."""
    output_dir = Path(cfg.output_dir)
    candidates = resume_candidates(output_dir, cfg.resume_from_checkpoint)
    fresh = TrainerState(max_steps=max_steps, fingerprint=fingerprint)
    if not candidates:
        if cfg.resume_from_checkpoint not in (None, False, "false", ""):
            check_resume(f"the run in {output_dir}", recorded_fingerprint(output_dir), fingerprint)
            accelerator.print(f"no checkpoint in {output_dir} yet: starting at step 0")
        return fresh
    failures = []
    for path in candidates:
        try:
            saved = TrainerState.load(path)  # read before anything loads into the model
        except (OSError, ValueError, TypeError) as err:
            failures.append(f"{path.name}: {type(err).__name__}: {err}")
            accelerator.print(f"checkpoint {path} is unreadable ({failures[-1]}); trying the previous one")
            continue
        check_resume(str(path), saved.fingerprint, fingerprint)
        try:
            accelerator.load_state(str(path))
        except Exception as err:  # noqa: BLE001 - any unreadable file means: try the previous checkpoint
            failures.append(f"{path.name}: {type(err).__name__}: {err}")
            accelerator.print(f"checkpoint {path} is unreadable ({failures[-1]}); trying the previous one")
            continue
        saved.max_steps, saved.fingerprint = max_steps, fingerprint
        accelerator.print(f"resumed from {path} at step {saved.global_step}")
        return saved
    from zephyr.errors import ZephyrError

    raise ZephyrError(
        f"resume_from_checkpoint: no checkpoint in {output_dir} could be loaded ({'; '.join(failures)}); nothing "
        "was trained. Fix or remove the broken checkpoints, or start a new run with --overwrite_output_dir true"
    )


def _window_normalization(accelerator, objective, cfg) -> tuple[bool, bool]:
    """(normalise the loss over the accumulation window's tokens?, by dividing before backward?).

    The gradients are normally divided by the window's token count at the step, once every micro-batch has counted
    its tokens. DeepSpeed keeps the gradients inside its engine, out of reach: with one micro-batch per step the count
    is known before backward and divides the loss instead (the same gradient); with more, the loss is the mean of
    the micro-batches' token means, and the run says so."""
    from accelerate.utils import DistributedType

    if not getattr(objective, "normalize_over_window", False):
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
) -> TrainResult:
    """Train `model` with `objective` on `train_dataset`; checkpoints and logs under cfg.output_dir.

    The model is prepared here (DDP / FSDP / DeepSpeed as the accelerate config says). Resumes from
    `cfg.resume_from_checkpoint` (true = the latest complete checkpoint in output_dir) when the checkpoint's
    fingerprint is this run's; DATA_IDENTITY (the tokenized training data's content fingerprint) is part of it.
    """
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(output_dir)
    accelerator.wait_for_everyone()

    # ---- setup: data order, step counts, optimizer, scheduler
    from transformers import get_scheduler

    n_rows = len(train_dataset)
    world = accelerator.num_processes
    batches_per_epoch = math.ceil(n_rows / (cfg.per_device_train_batch_size * world))
    steps_per_epoch, max_steps = total_update_steps(cfg, batches_per_epoch)
    optimizer = build_optimizer(model, cfg)
    scheduler = get_scheduler(
        cfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=cfg.num_warmup_steps(max_steps),
        num_training_steps=max_steps,
        scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or None,
    )
    # The scheduler stays outside `prepare`: accelerate would step it once per process per optimizer step (it
    # assumes a schedule sized per process), which decays the rate N times too fast for our global step counts.
    model, optimizer = accelerator.prepare(model, optimizer)
    # Nor is it checkpointed: accelerate would pickle it (and unpickle it with weights_only=False on resume, so a
    # checkpoint from elsewhere could run code). Its rate is a function of the step alone: resuming replays the steps.
    if getattr(cfg, "gradient_checkpointing", False):
        accelerator.unwrap_model(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs or {"use_reentrant": False}
        )

    def dataloader_for(epoch: int) -> DataLoader:
        order = epoch_order(
            n_rows,
            epoch,
            cfg.data_seed if cfg.data_seed is not None else cfg.seed,
            cfg.train_sampling_strategy,
        )
        dl = DataLoader(
            torch.utils.data.Subset(train_dataset, order),
            batch_size=cfg.per_device_train_batch_size,
            shuffle=False,
            collate_fn=collate,
            num_workers=cfg.dataloader_num_workers or 0,
            drop_last=bool(cfg.dataloader_drop_last),
        )
        return accelerator.prepare_data_loader(dl, device_placement=True)

    eval_loader = None
    if eval_dataset is not None and len(eval_dataset):
        eval_loader = accelerator.prepare_data_loader(
            DataLoader(
                eval_dataset,
                batch_size=cfg.per_device_eval_batch_size,
                shuffle=False,
                collate_fn=eval_collate or collate,
            )
        )

    # ---- resume
    fingerprint = run_fingerprint(cfg, accelerator, data_identity)
    state = resume(accelerator, cfg, fingerprint, max_steps)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended, it is a replay
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(state.global_step):
            scheduler.step()

    log = MetricsLog(accelerator, output_dir, cfg.report_to or [])
    if accelerator.is_main_process:
        log.truncate_after(state.global_step)  # records of steps the resumed run will redo
    eval_every = None
    if cfg.eval_strategy == "steps" and eval_loader is not None:
        eval_every = every(cfg.eval_steps if cfg.eval_steps is not None else cfg.logging_steps, max_steps)
    save_every = every(cfg.save_steps, max_steps) if cfg.save_strategy == "steps" else None
    logging_steps = every(cfg.logging_steps, max_steps) or 1

    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=max_steps, initial=state.global_step, desc=f"{cfg.stage}", unit="step", dynamic_ncols=True
        )

    window: dict[str, list[float]] = defaultdict(list)
    window_losses: list[float] = []  # one per optimizer step since the last log
    micro_losses: list[float] = []  # the current step's micro-batches
    step_nll, step_items = 0.0, 0.0  # the current step's labelled-token loss sum and count, all processes
    windowed, divide_before_backward = _window_normalization(accelerator, objective, cfg)
    window_tokens, window_start = 0, time.perf_counter()
    stopped_early = False

    def checkpoint():
        path = save_checkpoint(accelerator, state, output_dir, cfg.save_total_limit)
        if on_save is not None:
            on_save(path)

    # ---- the loop
    model.train()
    with _StopRequest() as stop:
        while state.global_step < max_steps:
            dl = dataloader_for(state.epoch)
            batches = (
                accelerator.skip_first_batches(dl, state.batches_in_epoch) if state.batches_in_epoch else dl
            )
            micro = 0
            for batch in batches:
                with accelerator.accumulate(model):
                    loss, metrics = objective(model, batch)
                    items = metrics.pop("_items", None)
                    if not torch.isfinite(loss.detach()).all():
                        _diverged("loss", loss, state.global_step + 1, output_dir)
                    if windowed:
                        sums = accelerator.gather(
                            torch.stack([loss.detach().float() * items, loss.new_tensor(items)])
                        )
                        step_nll += float(sums.reshape(-1, 2)[:, 0].sum())
                        step_items += float(sums.reshape(-1, 2)[:, 1].sum())
                        if divide_before_backward:  # the window is this micro-batch: its token count is known
                            accelerator.backward(
                                loss * items * accelerator.num_processes / max(step_items, 1.0)
                            )
                        else:
                            # Backpropagate the token sum (accelerate divides by the accumulation steps: undone
                            # here); the gradients are divided by the window's token count at the step.
                            accelerator.backward(loss * items * accelerator.gradient_accumulation_steps)
                    else:
                        accelerator.backward(loss)
                        micro_losses.append(
                            accelerator.gather(loss.detach().float().reshape(1)).mean().item()
                        )
                    grad_norm = None
                    if accelerator.sync_gradients:
                        fault_point(f"step:{state.global_step + 1}")
                        if windowed and not divide_before_backward:  # DDP averaged over processes: count all
                            _scale_gradients(model, accelerator.num_processes / max(step_items, 1.0))
                        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                            if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)).all():
                                _diverged("gradient norm", grad_norm, state.global_step + 1, output_dir)
                        step_lr = scheduler.get_last_lr()[0]  # the rate this step used, as Trainer logs it
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += 1
                micro += 1
                tokens = int(accelerator.gather(real_tokens(batch).reshape(1)).sum())
                state.total_tokens += tokens
                window_tokens += tokens
                for k, v in metrics.items():
                    window[k].append(v)
                if not accelerator.sync_gradients:
                    continue
                if windowed:
                    window_losses.append(step_nll / max(step_items, 1.0))
                    step_nll, step_items = 0.0, 0.0
                else:
                    window_losses.append(sum(micro_losses) / len(micro_losses))
                    micro_losses.clear()

                # ---- one optimizer step done
                state.global_step += 1
                step = state.global_step
                if step % logging_steps == 0 or step == max_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": step,
                        "epoch": round(state.epoch + state.batches_in_epoch / max(len(dl), 1), 4),
                        "loss": sum(window_losses) / len(window_losses),
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "learning_rate": step_lr,
                        **_mean_metrics(window),
                        "num_tokens": state.total_tokens,
                        "tokens_per_second": window_tokens / max(elapsed, 1e-9),
                    }
                    state.log_history.append(record)
                    log.write(record)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{record['loss']:.4f}",
                            lr=f"{record['learning_rate']:.2e}",
                            tok_s=f"{record['tokens_per_second']:.0f}",
                        )
                    window.clear()
                    window_losses.clear()
                    window_tokens, window_start = 0, time.perf_counter()
                if bar is not None:
                    bar.update(1)
                if eval_every and step % eval_every == 0:
                    record = {"step": step, **evaluate(accelerator, model, objective, eval_loader)}
                    state.log_history.append(record)
                    log.write(record)
                if stop.requested:
                    checkpoint()
                    stopped_early = True
                    break
                if save_every and step % save_every == 0 and step < max_steps:
                    checkpoint()
                if step >= max_steps:
                    break
            if stopped_early:
                break
            # ---- end of an epoch (the last one included, even when max_steps ends it exactly there)
            epoch_done = state.batches_in_epoch >= len(dl)
            if epoch_done and cfg.eval_strategy == "epoch" and eval_loader is not None:
                record = {
                    "step": state.global_step,
                    "epoch": state.epoch + 1,
                    **evaluate(accelerator, model, objective, eval_loader),
                }
                state.log_history.append(record)
                log.write(record)
            if state.global_step >= max_steps:
                break
            state.epoch += 1
            state.batches_in_epoch = 0
            if cfg.save_strategy == "epoch":
                checkpoint()
    if bar is not None:
        bar.close()
    if not stopped_early and eval_loader is not None and cfg.eval_strategy != "no":
        last = state.log_history[-1] if state.log_history else {}
        if "eval_loss" not in last or last.get("step") != state.global_step:
            record = {"step": state.global_step, **evaluate(accelerator, model, objective, eval_loader)}
            state.log_history.append(record)
            log.write(record)
    return TrainResult(model=model, state=state, output_dir=output_dir, stopped_early=stopped_early)
