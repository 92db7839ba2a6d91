"""The training loop: `fit` runs epochs, `train_epoch` steps, `train_step` one optimiser step.

`TrainLoop.fit` runs epochs of optimiser steps (each `accum_steps` micro-batches), validates at the
clip level at epoch ends, keeps `last.pt` / `best.pt`, and stops cleanly on SIGTERM/SIGINT after
saving. Read it top to bottom. `Trainer` (trainer.py) builds what it uses and is a `TrainLoop`:

    cfg, run_dir, ckpt_dir, dist, device, precision, num_workers   the run
    train_set, val_set, loader, sampler, steps_per_epoch, micro_batch, accum, global_batch,
    num_classes, normalizer, device_augment, gpu_decoder, mix        the data
    model, train_model, forward, ema, optimizer, scheduler, scaler,
    total_steps                                                      the model and its optimisation
    state (TrainState: the counters), logger, save(name), close()    the run's position and files
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from squarefuse.config.compose_config import shell_override
from squarefuse.datasets.formats import find_format
from squarefuse.evaluation.evaluator import evaluate, name_videos
from squarefuse.evaluation.inference_loop import BatchSettings
from squarefuse.runtime import distributed
from squarefuse.runtime.precision import autocast

log = logging.getLogger("squarefuse")

# SIGTERM/SIGINT: stop after the first step whose all-reduce carries it to every rank, and save;
# SIGUSR2: SLURM's (submitit's) warning before preemption or the time limit, the same and then requeue.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

# The loader is called the bottleneck when the step waits this long for data, on average.
DATA_BOUND_SHARE = 0.3


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def data_bound_warning(dataset_name: str, wait_share: float, clips_per_s: float, num_workers: int) -> str:
    """The warning when the step waits for data (`DATA_BOUND_SHARE`), with the remedies of the dataset's kind:
    a token cache is read, not decoded, so the video scripts are no help there."""
    if not find_format(dataset_name).decodes_videos:
        remedies = (
            "Raise trainer.num_workers, keep the cache on a local disk with free RAM for its shards (it is read "
            "memory-mapped), or cache fewer tokens per frame (scripts/cache_tokens.py tokens=cls or pooled)."
        )
    elif dataset_name == "synthetic":
        remedies = "Raise trainer.num_workers, or use dataset.repeated_aug to reuse decoded clips."
    else:
        remedies = (
            "Raise trainer.num_workers, decode smaller videos (scripts/prepare_k400.py, re-encode SSv2 with "
            "scripts/prepare_ssv2.py), or use dataset.repeated_aug to reuse decoded clips."
        )
    return (
        f"data loading is the bottleneck: {100 * wait_share:.0f}% of step time is spent waiting for data "
        f"({clips_per_s:.1f} clips/s with {num_workers} workers per rank). {remedies}"
    )


class TrainLoop:
    """The loop of a `Trainer` (see the module's docstring for what the trainer provides)."""

    def _start_session(self) -> None:
        """This process's stop flags (never in a checkpoint): set by the trainer before `fit`."""
        # The signal this process received, and the stop every rank agreed on (set after a step's
        # all-reduce, never by the handler): a rank that acted on its own signal while another's
        # had not arrived yet would save (collectives) while the other stepped, and both would hang.
        self._signal_received: int | None = None
        self._stop_signal: int | None = None
        self._data_bound_reported = False

    def fit(self) -> dict[str, Any]:
        """Train to the end (or to a stop signal); return a summary.

        However it ends, the last record of metrics.jsonl says how (`split: end`, status finished,
        interrupted or crashed, this session's wall time): what `scripts/report.py` reads.
        """
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        started, status, error = time.perf_counter(), "crashed", None
        try:
            if self.state.epoch > 0 and self.state.batch_in_epoch == 0 and self._validation_due():
                self._validate_and_save()  # resumed from an epoch end whose validation did not finish
            while self.state.step < self.total_steps and self._stop_signal is None and not self._out_of_patience():
                self.train_epoch()
                if self._stop_signal is not None:
                    break
                if self.state.batch_in_epoch >= self.steps_per_epoch * self.accum:
                    self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
                    # The epoch is saved before its validation runs, so a failing one loses nothing.
                    self.save("last.pt")
                    if self._validation_due():
                        self._validate_and_save()
            if self._stop_signal is not None:
                self.save("last.pt")
                if self.dist.is_main:
                    log.warning(
                        "stopped by %s at step %d: saved %s; run the same command again to resume",
                        signal.Signals(self._stop_signal).name,
                        self.state.step,
                        self.ckpt_dir / "last.pt",
                    )
                status = "interrupted"
                # submitit's preemption/timeout handler (SIGUSR2): now that the checkpoint is safe,
                # let it requeue the job (rank 0) — the requeued job resumes from last.pt.
                handler = previous.get(self._stop_signal)
                if self._stop_signal == signal.SIGUSR2 and callable(handler):
                    handler(self._stop_signal, None)
            else:
                self.save("last.pt")
                if self._out_of_patience() and self.dist.is_main:
                    log.info(
                        "stopped early at epoch %d step %d: no better val top-1 in %d validations "
                        "(trainer.patience); best %.2f at epoch %s",
                        self.state.epoch,
                        self.state.step,
                        self.state.validations_since_best,
                        self.state.best_top1,
                        self.state.best_epoch,
                    )
                if self.val_set is not None and self.state.last_val_step != self.state.step:
                    self._validate_and_save()  # training ended mid-epoch (max_steps): validate the final weights
                status = "finished"
                if self.dist.is_main:
                    log.info(self._summary_line(time.perf_counter() - started))
        except BaseException as e:
            if status == "crashed":  # not the requeue handler's exit after a clean stop
                error = f"{type(e).__name__}: {e}"
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            end = {"step": self.state.step, "epoch": self.state.epoch, "split": "end", "status": status}
            end |= {"stopped_early": True} if status == "finished" and self._out_of_patience() else {}
            self.logger.log({**end, "wall_s": time.perf_counter() - started, **({"error": error} if error else {})})
            self.logger.close()
            self.close()
        return {
            "status": "interrupted" if self._stop_signal is not None else "finished",
            "signal": self._stop_signal,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "best_val_clip_top1": self.state.best_top1 if self.state.best_top1 > -math.inf else None,
            "run_dir": str(self.run_dir),
        }

    def _summary_line(self, wall_s: float) -> str:
        """The last line of a finished run: its best and final validation, wall time, and what to run next."""
        minutes, seconds = divmod(round(wall_s), 60)
        parts = [f"training finished in {minutes}m {seconds:02d}s"]
        best = self.ckpt_dir / "best.pt"
        if self.state.best_epoch is not None or self.state.best_top1 > -math.inf:
            at = f" at epoch {self.state.best_epoch}" if self.state.best_epoch is not None else ""
            parts.append(f"best val top-1 {self.state.best_top1:.2f}{at}")
        if self.state.last_val_top1 is not None:
            parts.append(f"final val top-1 {self.state.last_val_top1:.2f} (epoch {self.state.epoch})")
        if not best.is_file():
            parts.append("no validation, no best.pt")
            best = self.ckpt_dir / "last.pt"
        parts.append(f"{best.name}: {best}")
        parts.append(f"next: python eval.py {shell_override('ckpt', _short_path(best))}")
        return " | ".join(parts)

    def _validation_due(self) -> bool:
        """At an epoch end: does this epoch validate (every val_every epochs, and the last one)?"""
        val_every = int(self.cfg.trainer.val_every)
        return (
            self.val_set is not None
            and val_every > 0
            and self.state.last_val_step != self.state.step
            and (self.state.epoch % val_every == 0 or self.state.step >= self.total_steps)
        )

    def _out_of_patience(self) -> bool:
        """Whether `trainer.patience` validations in a row brought no better val top-1 (the rule that
        ends every run of a study alike when it has converged; null: train to the end)."""
        patience = self.cfg.trainer.get("patience")
        return patience is not None and self.state.validations_since_best >= int(patience)

    def _validate_and_save(self) -> None:
        self.validate()
        self.save("last.pt")  # again, now with the validation's outcome (best top-1, last_val_step)

    def _on_signal(self, signum: int, frame) -> None:
        if self._signal_received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._signal_received = signum

    def train_epoch(self) -> None:
        """Optimiser steps until the epoch ends, training ends, or a stop is requested."""
        tcfg = self.cfg.trainer
        self.model.train()
        self.sampler.set_epoch(self.state.epoch, start=self.state.batch_in_epoch * self.micro_batch)
        done = self.state.batch_in_epoch // self.accum  # optimiser steps of this epoch already done
        steps_left = min(self.steps_per_epoch - done, self.total_steps - self.state.step)
        batches = iter(self.loader)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=done,
            desc=f"epoch {self.state.epoch}",
            disable=not self.dist.is_main,
            dynamic_ncols=True,
            leave=False,
        )
        # Log lines (the train loss among them) are printed above the progress bar, not through it.
        with logging_redirect_tqdm():
            window = self._new_window()
            t_last = time.perf_counter()
            for _ in range(steps_left):
                loss, wait = self.train_step(batches)
                now = time.perf_counter()
                if loss is None:
                    window["skipped"] += 1
                else:
                    window["loss"] += loss
                window["steps"] += 1
                window["wait"] += wait
                window["time"] += now - t_last
                t_last = now
                bar.update(1)
                if self.state.step % int(tcfg.log_every) == 0 or self.state.step == self.total_steps:
                    self._log_train(window, bar)
                    window = self._new_window()
                if self._stop_signal is not None:
                    break
                if self.state.step % int(tcfg.ckpt_every) == 0:
                    self.save("last.pt")
        bar.close()

    def _new_window(self) -> dict[str, Any]:
        """Sums over the steps since the last train log line (loss over the steps not skipped)."""
        return {"loss": torch.zeros((), device=self.device), "steps": 0, "skipped": 0, "wait": 0.0, "time": 0.0}

    def train_step(self, batches) -> tuple[torch.Tensor | None, float]:
        """One optimiser step over `accum_steps` micro-batches.

        Returns (mean loss, or None for a step skipped for a non-finite loss; seconds waiting for data).
        """
        tcfg = self.cfg.trainer
        wait = 0.0
        loss_sum = torch.zeros((), device=self.device)
        finite_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (dataset indices, finite per video)
        for micro in range(self.accum):
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            video, mask, target = self._prepare(batch)
            if batch.get("video") is not None and batch["video"].is_floating_point():  # cached tokens (pixels: uint8)
                finite_inputs.append((batch["index"], video.isfinite().reshape(len(batch["index"]), -1).all(dim=1)))
            last_micro = micro == self.accum - 1
            no_sync = (
                self.train_model.no_sync()
                if (self.dist.is_distributed and not last_micro)
                else contextlib.nullcontext()
            )
            with no_sync:
                with autocast(self.device, self.precision):
                    logits = self.forward(video, mask)
                loss = soft_cross_entropy(logits, target)
                self.scaler.scale(loss / self.accum).backward()
            loss_sum += loss.detach()
            self.state.batch_in_epoch += 1
        loss_mean = loss_sum / self.accum

        # Every rank must take the same decision: one tiny all-reduce of (non-finite, stop, non-finite
        # inputs) flags. Non-finite inputs (a damaged token cache) make a step non-finite even when the
        # loss is not: their gradients would turn the weights NaN and the next, clean batch would be
        # blamed. MixUp is refused on cached tokens, so a flagged input is the video itself.
        bad_inputs = [int(i) for index, ok in finite_inputs for i in index[~ok.cpu()]]
        flags = torch.tensor(
            [
                float(bool(bad_inputs) or not torch.isfinite(loss_mean)),
                float(self._signal_received is not None),
                float(bool(bad_inputs)),
            ],
            device=self.device,
        )
        flags = distributed.all_reduce_sum(flags)
        if flags[1] > 0 and self._stop_signal is None:
            self._stop_signal = self._signal_received or signal.SIGTERM
        if flags[0] > 0:
            self._skip_nonfinite_step(bad_inputs if flags[2] > 0 else None)
            return None, wait
        self.state.consecutive_skips = 0

        if tcfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(tcfg.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.scheduler.step_update(num_updates=self.state.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.step)
        return loss_mean, wait

    def _skip_nonfinite_step(self, bad_inputs: list[int] | None) -> None:
        """A non-finite loss (or, `bad_inputs` not None, non-finite inputs: these dataset indices here,
        or on another rank) on some rank: stop (trainer.nonfinite=stop), or drop the gradients and count
        the step (skip), stopping after more than `max_consecutive_skips` in a row."""
        tcfg = self.cfg.trainer
        self.optimizer.zero_grad(set_to_none=True)
        what = "loss"
        advice = "Lower optim.lr, set trainer.clip_grad, use trainer.precision=bf16/fp32, or trainer.nonfinite=skip"
        if bad_inputs is not None:  # the data, not the optimiser: say which videos
            what = "inputs"
            records = getattr(self.train_set, "records", None)
            names = [records[i].path if records is not None else f"index {i}" for i in bad_inputs]
            advice = (
                f"The batch's inputs hold NaN or infinite values ({name_videos(names) or 'on another rank'}): "
                "the data is damaged, not the learning rate; make the token cache again (scripts/cache_tokens.py)"
            )
        if tcfg.nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite {what} at step {self.state.step + 1} (epoch {self.state.epoch}); the weights were not "
                f"updated and {self.ckpt_dir / 'last.pt'} is the last good checkpoint. {advice}"
            )
        # A skipped step still counts: the schedule, max_steps and the epochs end as planned.
        self.state.step += 1
        self.scheduler.step_update(num_updates=self.state.step)
        self.state.num_skipped += 1
        self.state.consecutive_skips += 1
        limit = int(tcfg.max_consecutive_skips)
        if self.state.consecutive_skips > limit:
            raise FloatingPointError(
                f"non-finite loss in {self.state.consecutive_skips} steps in a row (steps "
                f"{self.state.step - self.state.consecutive_skips + 1} to {self.state.step}, epoch "
                f"{self.state.epoch}), more than trainer.max_consecutive_skips={limit}: stopping. The weights were "
                f"not updated by these steps; {self.ckpt_dir / 'last.pt'} is the last checkpoint. Lower optim.lr, "
                f"set trainer.clip_grad, use trainer.precision=bf16/fp32, or check the data"
            )
        if self.dist.is_main:
            log.warning(
                "non-finite %s at step %d: step skipped (%d so far, %d in a row)%s",
                what,
                self.state.step,
                self.state.num_skipped,
                self.state.consecutive_skips,
                f". {advice}" if bad_inputs is not None else "",
            )

    def _prepare(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 batch -> device -> float normalised -> MixUp/CutMix; targets are soft labels."""
        mask = batch["mask"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        self.state.num_replaced += int(batch["num_replaced"].sum())
        if self.gpu_decoder is not None:  # the workers sampled, the GPU decodes and crops
            video, replaced = self.gpu_decoder(batch["path"], batch["frame_index"])
            self.state.num_replaced += replaced
            if video.dim() == 6:
                mask = mask[:, None].expand(-1, video.shape[1], -1)
        else:
            video = batch["video"].to(self.device, non_blocking=True)
        if video.dim() == 6:  # repeated augmentation: [B, R, T, C, H, W] -> [B*R, T, C, H, W]
            repeats = video.shape[1]
            video, mask = video.flatten(0, 1), mask.flatten(0, 1)
            label = label.repeat_interleave(repeats)
        if self.device_augment is not None:
            video = self.device_augment(video)
        video = self.normalizer(video)
        tcfg = self.cfg.trainer
        if self.mix is not None and torch.rand(()) < float(tcfg.mixup_prob):
            # Wrapped as a Video so torchvision treats [B, T, C, H, W] as a batch of clips.
            video, target = self.mix(tv_tensors.Video(video), label)
            video = video.as_subclass(torch.Tensor)
            mask = mask & mask.roll(1, 0)  # v2 MixUp/CutMix mix each clip with the previous one
        else:
            target = F.one_hot(label, self.num_classes).float()
        smoothing = float(tcfg.label_smoothing)
        if smoothing > 0:
            target = target * (1.0 - smoothing) + smoothing / self.num_classes
        return video, mask, target

    def _log_train(self, window: dict[str, Any], bar: tqdm) -> None:
        steps = max(1, window["steps"])
        # Every rank skips the same steps (the decision is all-reduced), so they agree on `trained`.
        trained = window["steps"] - window["skipped"]
        loss_sum = distributed.all_reduce_sum(window["loss"].clone())
        loss = float(loss_sum) / (trained * self.dist.world_size) if trained > 0 else None
        clips_per_s = steps * self.global_batch / max(window["time"], 1e-9)
        wait_share = window["wait"] / max(window["time"], 1e-9)
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        record = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "split": "train",
            "loss": loss,  # null when every step of the window was skipped
            "lr": lr,
            "clips_per_s": clips_per_s,
            "data_wait": wait_share,
            "num_replaced": self.state.num_replaced,
        }
        if window["skipped"]:
            record["skipped_steps"] = window["skipped"]
        self.logger.log(record)
        if self.dist.is_main:
            log.info(
                "epoch %d step %d | train loss %s lr %.2e | %.1f clips/s, data wait %.0f%%",
                self.state.epoch,
                self.state.step,
                "skipped" if loss is None else f"{loss:.4f}",
                lr,
                clips_per_s,
                100 * wait_share,
            )
        bar.set_postfix(
            loss="skipped" if loss is None else f"{loss:.4f}",
            lr=f"{lr:.2e}",
            clips_s=f"{clips_per_s:.1f}",
            wait=f"{100 * wait_share:.0f}%",
        )
        self._report_data_bound(wait_share, clips_per_s)

    def _report_data_bound(self, wait_share: float, clips_per_s: float) -> None:
        """After the first window (worker start-up), say once if the GPU/CPU is starved of data."""
        if (
            self.state.step > int(self.cfg.trainer.log_every)
            and wait_share > DATA_BOUND_SHARE
            and not self._data_bound_reported
        ):
            self._data_bound_reported = True
            if self.dist.is_main:
                log.warning(data_bound_warning(str(self.cfg.dataset.name), wait_share, clips_per_s, self.num_workers))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation on val, by which best.pt and `trainer.patience` go: clip-level (1 clip x 1 crop, a
        cheap training signal) or, with `trainer.val_views=all`, every eval view averaged as eval.py does.

        The record keeps the split name `val_clip` either way (reports and resumed runs read it);
        its `views` says which: ``1x1`` or ``CLIPSxCROPS``.
        """
        tcfg = self.cfg.trainer
        model = self.ema.module if (self.ema is not None and tcfg.ema.eval) else self.model
        batch_size = int(tcfg.val_batch_size or tcfg.batch_size)
        settings = BatchSettings(self.device, self.normalizer, batch_size, self.num_workers, self.precision)
        result = evaluate(model, self.val_set, settings, dist_info=self.dist)
        views = "x".join(str(v) for v in self.val_set.views)
        record = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "split": "val_clip",
            "views": views,
            **result.metrics,  # every registered metric (`metrics.METRICS`), by name
            "topk": result.topk,
            "num_videos": result.num_videos,
            "num_failed": result.num_failed,
            "weights": "ema" if model is not self.model else "model",
        }
        self.logger.log(record)
        self.state.last_val_step, self.state.last_val_top1 = self.state.step, result.top1
        if self.dist.is_main:
            log.info(
                "epoch %d step %d | %s val %s (%d videos, %d failed)",
                self.state.epoch,
                self.state.step,
                "clip-level" if views == "1x1" else f"{views}-view",
                result.metrics_text(),
                result.num_videos,
                result.num_failed,
            )
        if not math.isfinite(result.loss):
            # NaN logits still give an argmax, hence a top-1: such a model must never become best.pt.
            if self.dist.is_main:
                log.warning(
                    "epoch %d step %d: the validation loss is %s: not a candidate for best.pt",
                    self.state.epoch,
                    self.state.step,
                    result.loss,
                )
        if math.isfinite(result.loss) and result.top1 > self.state.best_top1:
            self.state.best_top1, self.state.best_epoch = result.top1, self.state.epoch
            self.state.validations_since_best = 0
            self.save("best.pt")
        else:
            self.state.validations_since_best += 1
        self.logger.summary({"best_val_clip_top1": self.state.best_top1})
        return record


def _short_path(path: Path) -> str:
    """`path` relative to the current folder when it lies below it (a command to copy), else as is."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
