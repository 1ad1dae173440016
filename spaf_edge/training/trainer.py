"""The SpAF trainer (DESIGN §3): frozen base, AdamW on the SpAF modules only.

Warmup + cosine learning rate, gradient clipping, periodic eval on a held-out split,
atomic checkpoints every ``save_every`` steps and exact ``resume``; every loss
component goes to the progress bar and to ``RUN_DIR/train_log.jsonl``.

Distribution goes through :class:`accelerate.Accelerator` (one CPU process works
too; see :mod:`spaf_edge.training.distributed`): DDP or DeepSpeed ZeRO wrap only the
SpAF modules (:class:`LossModule`), the frozen base is loaded once per process and
never synchronised; the batches are sharded per rank; only the main process logs and
writes, and ranks meet at a barrier after each checkpoint. The learning-rate scheduler
is stepped once per optimizer step by hand (not prepared), so its schedule counts
optimizer steps on any number of ranks.

Data order. The batch order is a permutation seeded by ``(seed, epoch)``, identical on
every rank. Micro-batch ``i`` of rank ``r`` is batch ``i * ranks + r`` of it, and an
optimizer step takes ``grad_accum`` micro-batches per rank; so step ``j`` trains on
sequences ``j*G .. (j+1)*G - 1`` of the permutation, ``G = batch_size * grad_accum *
ranks``, as one process with batch size ``G`` would. An epoch ends after the last full
global batch. A resumed run continues at the sequence the interrupted one would have
trained next (it must use the same number of processes). A checkpoint records that
position (epoch, micro-batch) with the count and a fingerprint of the training sequences,
and a resume on data that gives other sequences is refused; ``settings.json`` records the
data path relative to the folder the run started in when the file lies inside it, so a
run folder moved to another machine (a fresh clone) resumes there.

Run folder: ``settings.json``, ``train_log.jsonl``, ``checkpoint/`` (latest, atomic;
see :mod:`spaf_edge.training.checkpoint`) and ``final/`` (SpAF components, loadable
with ``SpAFModel.load_spaf_components`` or ``--components``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spaf_edge.core.atomic import atomic_write_text
from spaf_edge.core.config import RECIPE_FIELDS, SpAFConfig
from spaf_edge.core.errors import ConfigError
from spaf_edge.core.progress import advance, progress_bar
from spaf_edge.model import SpAFModel
from spaf_edge.training import checkpoint as ckpt
from spaf_edge.training import distributed as dist
from spaf_edge.training.data import (
    TokenDataset,
    build_sequences,
    frequent_tokens,
    load_examples,
    split_holdout,
)
from spaf_edge.training.distributed import DistributedSettings
from spaf_edge.training.features import (
    CachedFeatureDataset,
    batch_features,
    build_feature_cache,
)
from spaf_edge.training.losses import DEFAULT_CHUNK_ROWS, spaf_losses

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
FINAL = "final"
# Settings that may differ when resuming (they do not change the optimisation path
# up to the resumed step; a changed ``steps`` reshapes the rest of the cosine schedule).
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "eval_batches", "time_budget", "compact_state",
                     "stop_after")
# With a time budget, the step time is measured between these two steps (counted from the
# loop's first step, so start-up kernels and allocator growth are left out) and ``steps``
# is cut to what fits. The cosine schedule reads ``steps`` live and follows the cut.
BUDGET_PROBE = (5, 25)
# The plan is then checked at doubling step counts (50, 100, 200, ... from the first step)
# while at most half of it is done, from the step time since the previous check, and
# changed (down, or up to the requested ``steps``) when it is off by more than this
# fraction of the steps left: a probe taken while the machine was busy, or quiet, must
# neither waste the budget nor overrun it. Late in the run a change would bend the
# schedule too much, so the checks stop at half.
BUDGET_REPLAN_TOLERANCE = 0.05


@dataclass
class TrainSettings:
    steps: int = 300  # optimizer steps
    batch_size: int = 4  # sequences per process and micro-step
    grad_accum: int = 1  # micro-batches per optimizer step (gradient accumulation)
    seq_len: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 20  # linear warmup steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at ``steps``
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    eval_every: int = 50  # 0 = eval only after the last step
    eval_fraction: float = 0.05  # held-out share of the sequences
    eval_batches: int = 8  # at most this many eval batches per eval
    save_every: int = 100  # 0 = only the final components
    seed: int = 0
    logit_chunk_rows: int = DEFAULT_CHUNK_ROWS  # rows of vocabulary logits held at once
    packing: bool = True
    max_examples: int | None = None  # use only the first rows of the data file
    feature_cache: str | None = None  # folder for cached fp16 base features
    time_budget: float | None = None  # seconds of optimizer steps; cuts ``steps`` to fit (None: no limit)
    init_from: str | None = None  # trained components the run started from (recorded by train_run)
    compact_state: bool = False  # checkpoints keep the optimizer moments in bfloat16 (checkpoint.compact_state)
    stop_after: float | None = None  # seconds after the first step: checkpoint and stop (this call only; not saved)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown training setting(s): {', '.join(unknown)}. Valid: {', '.join(sorted(known))}.")
        settings = cls(**data)
        settings.validate()
        return settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "logit_chunk_rows")
        non_negative = ("warmup", "eval_every", "save_every", "eval_batches")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"Invalid {name}={getattr(self, name)!r}: expected an integer >= 1.")
        for name in non_negative:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"Invalid {name}={getattr(self, name)!r}: expected an integer >= 0.")
        if self.seq_len < 2:
            raise ConfigError(f"Invalid seq_len={self.seq_len}: expected an integer >= 2.")
        if not self.lr > 0:
            raise ConfigError(f"Invalid lr={self.lr}: expected a number > 0.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"Invalid min_lr_ratio={self.min_lr_ratio}: expected a number in [0, 1].")
        if self.grad_clip < 0:
            raise ConfigError(f"Invalid grad_clip={self.grad_clip}: expected a number >= 0 (0 = off).")
        for name in ("time_budget", "stop_after"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"Invalid {name}={getattr(self, name)}: expected seconds > 0, or unset.")


@dataclass
class TrainResult:
    run_dir: Path
    final: Path
    steps: int
    train_losses: dict[str, float]  # mean over the last logged steps
    eval_losses: dict[str, float] | None
    tokens_per_second: float  # sequence tokens per second of optimizer steps, all ranks (eval and saves excluded)
    seconds: float
    replica_max_diff: float | None = None  # largest SpAF weight difference between ranks (None: one process)
    main_process: bool = True  # False on the other ranks of a distributed run


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of ``range(size)`` fixed by ``(seed, epoch)``: identical on every rank."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=order).tolist())


class LossModule(nn.Module):
    """What the engine wraps: batch -> loss components (the base forward included).

    Only the adapters and AlignmentHeads are registered submodules, so DDP buckets and
    broadcasts, and DeepSpeed partitions and casts, the SpAF parameters alone: no
    gradient buffer or bucket is ever allocated for the frozen base. The SpAFModel
    (base included) is a plain attribute that forward uses.
    """

    def __init__(self, model: SpAFModel, chunk_rows: int, normalize=None) -> None:
        super().__init__()
        self.adapters = model.adapters
        self.alignment_heads = model.alignment_heads
        self.__dict__["spaf"] = model  # not a submodule: hidden from the engines
        self.chunk_rows = chunk_rows
        self.normalize = normalize  # loss divisors across ranks (losses.py)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model = self.spaf
        return spaf_losses(model, batch, batch_features(model, batch), self.chunk_rows, self.normalize)


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warmup to 1, then cosine to ``min_lr_ratio`` at ``settings.steps``."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    span = max(1, settings.steps - settings.warmup)
    progress = min(1.0, (step - settings.warmup) / span)
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def prepare_data(
    model: SpAFModel, data_path: str | os.PathLike, settings: TrainSettings
) -> tuple[TokenDataset, TokenDataset | None]:
    """Read, render, pack and split the data file."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ConfigError("The model has no tokenizer; load the base with SpAFModel.from_pretrained.")
    examples = load_examples(data_path, tokenizer, settings.max_examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    dataset = build_sequences(examples, settings.seq_len, pad_id, settings.packing)
    train_set, eval_set = split_holdout(dataset, settings.eval_fraction, settings.seed)
    if len(train_set) < settings.batch_size:
        raise ConfigError(
            f"The training split has {len(train_set)} sequences, fewer than --batch-size "
            f"{settings.batch_size}. Add data, lower --seq-len or --batch-size."
        )
    return train_set, eval_set


def choose_draft_vocab(model: SpAFModel, train_set: TokenDataset) -> None:
    """Set V_d from the training data when the config asks for one and none is loaded."""
    size = model.config.draft_vocab_size
    vocab_size = model.base.config.vocab_size
    if size is None or size >= vocab_size or model.draft_vocab.numel():
        return
    eos = model.base.generation_config.eos_token_id if model.base.generation_config else None
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        eos_ids.append(model.tokenizer.eos_token_id)
    model.set_draft_vocab(frequent_tokens(train_set, size, vocab_size, always=eos_ids))


def train(
    model: SpAFModel,
    data_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    settings: TrainSettings,
    resume: bool = False,
    progress: bool = True,
    distributed: DistributedSettings | None = None,
) -> TrainResult:
    """Train ``model``'s SpAF modules on ``data_path``; write the run folder; return a summary.

    With ``resume``, the SpAF weights, optimizer, scheduler, step and RNG state come
    from ``run_dir``'s checkpoint and training continues from its step. Every process
    of a distributed run calls this with the same arguments (launched by torchrun,
    accelerate launch or deepspeed); ``distributed`` picks precision and DeepSpeed.
    """
    run = TrainingRun(model, data_path, Path(run_dir), settings, resume, progress,
                      distributed or DistributedSettings())
    if settings.eval_every and run.step == 0:
        run.eval_losses = run.evaluate()  # the starting point
    run.start()
    while run.step < settings.steps:  # a time budget may move settings.steps
        losses = run.optimizer_step()
        if run.budget is not None:
            run.check_budget()
        run.show_progress(losses)
        last = run.step == settings.steps
        if settings.eval_every and run.step % settings.eval_every == 0 or last:
            run.eval_losses = run.evaluate() or run.eval_losses
        stop = not last and run.slice_over()
        if stop or settings.save_every and (run.step % settings.save_every == 0 or last):
            run.save_checkpoint()
        if stop:
            run.log_stop()
            break
    return run.finish()


class TrainingRun:
    """One call of :func:`train`: what its phases share (engines, data stream, clock, counters).

    The constructor sets the run up (accelerator, resumed state, data, optimizer and
    scheduler, run folder); :func:`train` then drives :meth:`optimizer_step`,
    :meth:`check_budget`, :meth:`evaluate` and :meth:`save_checkpoint`, and ends with
    :meth:`finish`. ``settings`` is the caller's object: a time budget rewrites its
    ``steps``, which the loop and the learning-rate schedule read live.
    """

    def __init__(self, model: SpAFModel, data_path: str | os.PathLike, run_dir: Path, settings: TrainSettings,
                 resume: bool, progress: bool, distributed: DistributedSettings) -> None:
        from accelerate.utils import set_seed

        settings.validate()
        self.model, self.run_dir, self.settings, self.progress = model, run_dir, settings, progress
        self.accelerator = accelerator = run_accelerator(model, settings, distributed)
        set_seed(settings.seed)
        state = load_resume_state(model, run_dir, accelerator.num_processes) if resume else None
        model.to(accelerator.device)

        train_set, eval_set = prepare_data(model, data_path, settings)
        choose_draft_vocab(model, train_set)
        train_data, eval_data = attach_feature_cache(model, train_set, eval_set, settings, accelerator, progress)
        sampler = EpochSampler(len(train_data), settings.seed)
        num_parameters = model.num_trainable_parameters()  # before ZeRO-3 could partition them
        self.parameters = model.spaf_parameters()
        self._prepare_engines(train_data, eval_data, sampler)
        steps_per_epoch = len(self.train_loader) // settings.grad_accum
        global_batch = settings.batch_size * settings.grad_accum * accelerator.num_processes
        if steps_per_epoch == 0:
            raise ConfigError(
                f"The training split has {len(train_set)} sequences, fewer than one global batch of {global_batch} "
                f"(--batch-size {settings.batch_size} x --grad-accum {settings.grad_accum} x "
                f"{accelerator.num_processes} processes). Add data, or lower --batch-size or --grad-accum."
            )
        if settings.compact_state and dist.uses_deepspeed(accelerator):
            raise ConfigError(ckpt.COMPACT_NEEDS_TORCH_OPTIMIZER)
        self.data_identity = {"train_sequences": len(train_set),
                              "fingerprint": ckpt.data_fingerprint(train_set.input_ids, train_set.loss_mask)}
        self.micro_batches_per_epoch = steps_per_epoch * settings.grad_accum
        if state is not None:
            check_resumed_data(state, self.data_identity, run_dir)
        self.step = self._restore(state) if state is not None else 0

        self.run_settings = {"train": stored_settings(settings), "data": ckpt.portable_path(data_path),
                             "spaf": model.config.to_dict()}
        self.logger = RunLog(run_dir, accelerator.is_main_process, keep_until=self.step if resume else None)
        if accelerator.is_main_process and not resume:
            write_run_settings(run_dir, self.run_settings)
        if accelerator.is_main_process:
            log.info("SpAF parameters: %d (%.2f%% of the base); %d train / %d eval sequences of %d tokens",
                     num_parameters, 100 * num_parameters / model.num_base_parameters(), len(train_set),
                     len(eval_set) if eval_set is not None else 0, settings.seq_len)
            log.info("%d process(es) (%s, %s precision); global batch %d sequences; %d optimizer steps per epoch",
                     accelerator.num_processes, accelerator.distributed_type, distributed.precision(),
                     global_batch, steps_per_epoch)

        self.batches = micro_batches(self.train_loader, sampler, self.micro_batches_per_epoch,
                                     self.step * settings.grad_accum)
        self.eval_losses: dict[str, float] | None = None
        self.recent: list[dict[str, float]] = []  # the last logged train losses
        self.tokens = 0  # sequence tokens trained on, all ranks
        self.train_seconds = 0.0  # optimizer steps only: eval and checkpoint time excluded from tokens/s
        self.started = 0.0
        self.bar = None
        self.budget: TimeBudget | None = None

    def _prepare_engines(self, train_data, eval_data, sampler: EpochSampler) -> None:
        """Loaders, LossModule and optimizer through the accelerator; the scheduler on the innermost optimizer."""
        settings, accelerator = self.settings, self.accelerator
        train_loader = torch.utils.data.DataLoader(
            train_data, batch_size=settings.batch_size, sampler=sampler, drop_last=True
        )
        eval_loader = (
            torch.utils.data.DataLoader(eval_data, batch_size=settings.batch_size) if eval_data is not None else None
        )
        module = LossModule(self.model, settings.logit_chunk_rows, dist.count_normalizer(accelerator))
        optimizer = torch.optim.AdamW(self.parameters, lr=settings.lr, weight_decay=settings.weight_decay)
        loaders = [train_loader] + ([eval_loader] if eval_loader is not None else [])
        self.module, self.optimizer, *loaders = accelerator.prepare(module, optimizer, *loaders)
        self.train_loader, self.eval_loader = loaders[0], (loaders[1] if eval_loader is not None else None)
        # Built on the innermost torch optimizer: the one whose lr DeepSpeed's ZeRO step reads too.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(dist.innermost_optimizer(self.optimizer),
                                                           lambda step: lr_factor(step, settings))

    def _restore(self, state: dict[str, Any]) -> int:
        """Put a checkpoint's optimizer, scheduler and this rank's RNG state back; return its step."""
        if isinstance(state["optimizer"], dict):
            ckpt.check_moment_shapes(state["optimizer"], self.parameters, self.run_dir / ckpt.CHECKPOINT)
        dist.load_optimizer_state(self.accelerator, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.last_epoch -= 1  # recompute the next step's rate: a resume may have changed ``steps``
        self.scheduler.step()
        per_rank = state.get("rng_per_rank")
        ckpt.restore_rng_state(per_rank[self.accelerator.process_index] if per_rank else state["rng"])
        return state["step"]

    def start(self) -> None:
        """Open the progress bar, start the clock and, with a time budget, its planner."""
        self.bar = progress_bar(total=self.settings.steps, initial=self.step, desc="train",
                                disable=not (self.progress and self.accelerator.is_main_process))
        self.started = time.perf_counter()
        self.module.train()
        if self.settings.time_budget is not None:
            self.budget = TimeBudget(self.settings.time_budget, self.settings.steps, self.step, self.started)

    def optimizer_step(self) -> dict[str, float]:
        """One optimizer step on ``grad_accum`` micro-batches per rank, logged; returns the losses (mean over ranks)."""
        settings, accelerator = self.settings, self.accelerator
        step_started = time.perf_counter()
        micro_losses = []
        for _ in range(settings.grad_accum):
            batch = next(self.batches)
            # accelerate divides the loss by grad_accum and syncs gradients on the last micro-batch only.
            with accelerator.accumulate(self.module):
                losses = self.module(batch)
                accelerator.backward(losses["total"])
            micro_losses.append({name: value.detach() for name, value in losses.items()})
            self.tokens += batch["input_ids"].numel() * accelerator.num_processes
        grad_norm = accelerator.clip_grad_norm_(self.parameters, settings.grad_clip) if settings.grad_clip else None
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()  # under DeepSpeed the engine stepped inside backward; this is a no-op
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        values = reduce_losses(accelerator, mean_losses(micro_losses))
        self.train_seconds += time.perf_counter() - step_started
        row = {"split": "train", "step": self.step, "lr": lr, **values, "tokens_per_s": self.tokens_per_second()}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        self.logger.write(row)
        self.recent = (self.recent + [values])[-20:]
        return values

    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0

    def show_progress(self, losses: dict[str, float]) -> None:
        postfix = {short_name(k): f"{v:.3f}" for k, v in losses.items()} | {"tok/s": f"{self.tokens_per_second():.0f}"}
        advance(self.bar, 1, **postfix)

    def evaluate(self) -> dict[str, float] | None:
        """Mean losses over at most ``eval_batches`` held-out batches and all ranks, logged (None: no eval split)."""
        if self.eval_loader is None:
            return None
        self.module.eval()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        with torch.no_grad():
            for index, batch in enumerate(self.eval_loader):
                if index >= self.settings.eval_batches:
                    break
                for name, value in self.module(batch).items():
                    sums[name] = sums.get(name, 0) + value.detach()
                count += 1
        self.module.train()
        result = {name: float(self.accelerator.reduce(value / count, "mean")) for name, value in sums.items()}
        self.logger.write({"split": "eval", "step": self.step, **result})
        return result

    def check_budget(self) -> None:
        """At the time budget's points: open its step-time window, or re-plan from the window that ends here."""
        if self.budget.opens_window(self.step):
            self.budget.open_window(time.perf_counter(), self.step)
        elif self.budget.check_due(self.step):
            self._replan()
            self.budget.checked(time.perf_counter(), self.step, self.settings.steps)

    def _replan(self) -> None:
        """Fit ``settings.steps`` to what the budget leaves; save the plan, without the budget, for a resume."""
        settings, budget = self.settings, self.budget
        now = time.perf_counter()
        # Every rank must stop at the same step: plan with the slowest rank's times.
        measured = torch.tensor([[now - self.started, budget.seconds_per_step(now, self.step)]],
                                dtype=torch.float64, device=self.accelerator.device)
        elapsed, per_step = self.accelerator.gather(measured).max(dim=0).values.tolist()
        steps = budget.plan(self.step, settings.steps, elapsed, per_step)
        if steps is not None:
            log.info("Time budget %.0f s at %.3f s/step: %d steps instead of %d",
                     budget.seconds, per_step, steps, settings.steps)
            self.logger.write({"split": "budget", "step": self.step, "seconds_per_step": per_step,
                               "steps": steps, "planned_steps": settings.steps})
            settings.steps = steps
            self.bar.total = steps
        # The saved settings get the planned steps and no budget: a resume continues this schedule.
        settings.time_budget = None
        self.run_settings["train"] = stored_settings(settings)
        if self.accelerator.is_main_process:
            write_run_settings(self.run_dir, self.run_settings)

    def slice_over(self) -> bool:
        """True once ``stop_after`` seconds have passed since the first step (on any rank: all stop together)."""
        if self.settings.stop_after is None:
            return False
        over = time.perf_counter() - self.started >= self.settings.stop_after
        flags = torch.tensor([float(over)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.gather(flags)
        return bool(flags.max())

    def log_stop(self) -> None:
        seconds = time.perf_counter() - self.started
        log.info("Stopped after %.0f s at step %d of %d (--stop-after); --resume continues the schedule.",
                 seconds, self.step, self.settings.steps)
        self.logger.write({"split": "stop", "step": self.step, "seconds": seconds, "steps": self.settings.steps})

    def save_checkpoint(self) -> None:
        data = {**self.data_identity, **data_position(self.step * self.settings.grad_accum,
                                                      self.micro_batches_per_epoch)}
        save_training_checkpoint(self.run_dir, self.accelerator, self.module, self.model, self.optimizer,
                                 self.scheduler, self.run_settings, self.step, data, self.settings.compact_state)

    def finish(self) -> TrainResult:
        """Close the bar, compare the ranks' weights, write ``final/`` and return the summary."""
        accelerator, recent = self.accelerator, self.recent
        self.bar.close()
        seconds = time.perf_counter() - self.started
        train_losses = {k: sum(r[k] for r in recent) / len(recent) for k in recent[0]} if recent else {}
        final = self.run_dir / FINAL
        replica_diff = dist.replica_max_diff(accelerator, self.parameters)
        if replica_diff:
            log.warning("SpAF weights differ between ranks by up to %.3g after training.", replica_diff)
        if replica_diff is not None:
            self.logger.write({"split": "replicas", "step": self.step, "max_abs_diff": replica_diff})
        master_weights = dist.full_spaf_weights(accelerator, self.module, self.model)  # collective under DeepSpeed
        if accelerator.is_main_process:
            meta = {"step": self.step, "train_losses": train_losses, "eval_losses": self.eval_losses}
            self.model.save_spaf_components(final, extra_meta=meta, state=master_weights)
        accelerator.wait_for_everyone()
        return TrainResult(self.run_dir, final, self.step, train_losses, self.eval_losses, self.tokens_per_second(),
                           seconds, replica_diff, accelerator.is_main_process)


class TimeBudget:
    """When a run under ``time_budget`` measures its step time, and how many steps then fit.

    Steps are counted from the run's ``first_step``. The window of :data:`BUDGET_PROBE`
    gives the first plan, which always replaces ``steps``; later checks come at doubling
    step counts while at most half of the plan is done, and move it only when it is off by
    more than :data:`BUDGET_REPLAN_TOLERANCE` of the steps left. Times are passed in.
    """

    def __init__(self, seconds: float, requested_steps: int, first_step: int, now: float) -> None:
        self.seconds = seconds
        self.requested_steps = requested_steps  # a plan never exceeds it
        self.first_step = first_step
        self.next_check: int | None = first_step + BUDGET_PROBE[1]
        self.window = (now, first_step)  # when and at which step the current step-time window began

    def opens_window(self, step: int) -> bool:
        return self.next_check is not None and step - self.first_step == BUDGET_PROBE[0]

    def open_window(self, now: float, step: int) -> None:
        self.window = (now, step)

    def check_due(self, step: int) -> bool:
        return step == self.next_check

    def seconds_per_step(self, now: float, step: int) -> float:
        """The mean step time since the window opened."""
        window_started, window_step = self.window
        return (now - window_started) / (step - window_step)

    def plan(self, step: int, planned: int, elapsed: float, per_step: float) -> int | None:
        """The step count to change ``planned`` to at this check, or None to keep it."""
        fitted = fit_steps(self.seconds, self.requested_steps, step, elapsed, per_step)
        off_by = abs(fitted - planned)
        first = step - self.first_step == BUDGET_PROBE[1]
        if off_by and (first or off_by > BUDGET_REPLAN_TOLERANCE * (planned - step)):
            return fitted
        return None

    def checked(self, now: float, step: int, planned: int) -> None:
        """Open the next window; the next check comes at twice the steps done, unless past half of ``planned``."""
        self.open_window(now, step)
        next_check = self.first_step + 2 * (step - self.first_step)
        self.next_check = next_check if next_check - self.first_step <= (planned - self.first_step) / 2 else None


def run_accelerator(model: SpAFModel, settings: TrainSettings, distributed: DistributedSettings):
    """The Accelerator for this run; refuses a base dtype that cannot train with its precision."""
    weights = model.config.loss_weights
    # A zero-weighted loss leaves the adapters or the heads without gradients: DDP must expect that.
    unused = (weights.adapter_base == 0 and weights.adapter_ce == 0 and weights.topk == 0) or (
        weights.alignment == 0 and weights.alignment_token == 0  # no rollout: the AlignmentHead is not used
    )
    accelerator = dist.make_accelerator(settings, distributed, model.hidden_size, unused)
    dist.check_precision_pair(next(model.base.parameters()).dtype, distributed.precision(),
                              dist.uses_deepspeed(accelerator))
    return accelerator


def resume_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a ``--resume`` continues; an error naming the fix when there is none."""
    checkpoint = ckpt.find_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"No checkpoint in {run_dir} to resume from. Run without --resume to start training.")
    return checkpoint


def load_resume_state(model: SpAFModel, run_dir: Path, num_processes: int) -> dict[str, Any]:
    """Load ``run_dir``'s checkpointed SpAF weights into ``model``; return its trainer state.

    The data position and global batch depend on the number of processes, so it must match.
    """
    checkpoint = resume_checkpoint(run_dir)
    model.load_spaf_components(checkpoint / ckpt.COMPONENTS)
    state = ckpt.load_trainer_state(checkpoint)
    if state.get("world_size", 1) != num_processes:
        raise ConfigError(
            f"{checkpoint} was written by a run with {state.get('world_size', 1)} process(es); this one has "
            f"{num_processes}. Resume with the same number of processes (the data position and "
            "global batch depend on it), or start a new run."
        )
    return state


def check_run_start(resume: bool, init_from: str | os.PathLike | None, spaf_options: Sequence[str] = (),
                    recipe_options: Sequence[str] = ()) -> None:
    """Refuse contradictory starts: ``--resume`` with ``--init-from``, or either with SpAF config options.

    ``spaf_options``: the SpAF config options given (their CLI names, e.g. ``--config``,
    ``--cutoff-layer``); ``recipe_options``: the loss-recipe ones (e.g. ``--topk-weight``). Used by
    ``spaf-edge train`` and :func:`train_run` alike. ``--resume`` keeps the checkpoint's SpAF config,
    loss recipe included; ``--init-from`` keeps the components' modules but may change the recipe.
    """
    if resume and init_from:
        raise ConfigError("--resume continues a run's checkpoint; --init-from starts a new run. Pass one of them.")
    refused = [*spaf_options, *(recipe_options if resume else ())]
    if (resume or init_from) and refused:
        source = "--resume keeps the saved" if resume else "--init-from keeps its components'"
        raise ConfigError(f"{source} SpAF config: drop {'/'.join(refused)}, or start a new run without it.")


def stored_settings(settings: TrainSettings) -> dict[str, Any]:
    """The settings as ``settings.json`` keeps them: ``stop_after`` belongs to one call, not to the run."""
    return {**settings.to_dict(), "stop_after": None}


def write_run_settings(run_dir: Path, run_settings: dict[str, Any]) -> None:
    atomic_write_text(run_dir / ckpt.SETTINGS, json.dumps(run_settings, indent=2) + "\n")


def fit_steps(budget: float, max_steps: int, step: int, elapsed: float, per_step: float) -> int:
    """The step count that ends within ``budget`` seconds, between ``step`` and ``max_steps``.

    Keeps 5 % of the remaining time for the evaluations and checkpoints still ahead.
    """
    remaining = budget - elapsed
    return min(max_steps, step + max(0, int(0.95 * remaining / per_step)))


def data_position(micro_batch: int, per_epoch: int) -> dict[str, int]:
    """Where the stream of :func:`micro_batches` stands after ``micro_batch`` micro-batches: the
    sampler's epoch and the micro-batch inside it (recorded in checkpoints; resume recomputes it)."""
    epoch, index = divmod(micro_batch, per_epoch)
    return {"epoch": epoch, "micro_batch": index, "micro_batches_per_epoch": per_epoch}


def check_resumed_data(state: dict[str, Any], current: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume on data that does not give the checkpoint's training sequences.

    The data position is a count of sequences into a seeded permutation of them: on other
    sequences it would point elsewhere, silently. Checkpoints of older versions have no record.
    """
    saved = state.get("data")
    if saved is None or all(saved.get(key) == current[key] for key in current):
        return
    raise ConfigError(
        f"--resume: the checkpoint in {run_dir} was trained on {saved.get('train_sequences')} training sequences "
        f"(fingerprint {str(saved.get('fingerprint'))[:12]}), and this data gives {current['train_sequences']} "
        f"({current['fingerprint'][:12]}), so its data position (epoch {saved.get('epoch')}, micro-batch "
        f"{saved.get('micro_batch')}) would point at other sequences. Pass the --data file (and --max-examples) "
        f"the run was trained on, or start a new run from its weights with --init-from "
        f"{run_dir / ckpt.CHECKPOINT / ckpt.COMPONENTS}."
    )


def micro_batches(loader, sampler: EpochSampler, per_epoch: int, start: int):
    """Yield micro-batches forever from micro-batch ``start``; an epoch is its first ``per_epoch`` batches."""
    epoch, skip = divmod(start, per_epoch)
    while True:
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for index, batch in enumerate(loader):
            if index >= per_epoch:
                break
            if index >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


def mean_losses(micro_losses: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([losses[name] for losses in micro_losses]).mean() for name in micro_losses[0]}


def attach_feature_cache(model, train_set, eval_set, settings, accelerator, progress):
    """Wrap the datasets with cached base features when ``settings.feature_cache`` is set."""
    if not settings.feature_cache:
        return train_set, eval_set
    wrapped = []
    for dataset in (train_set, eval_set):
        if dataset is None:
            wrapped.append(None)
            continue
        with accelerator.main_process_first():
            folder = build_feature_cache(model, dataset, settings.feature_cache, settings.batch_size,
                                         progress and accelerator.is_main_process)
        wrapped.append(CachedFeatureDataset(dataset, folder))
    return wrapped[0], wrapped[1]


def save_training_checkpoint(run_dir, accelerator, module, model, optimizer, scheduler, run_settings, step,
                             data: dict[str, Any] | None = None, compact: bool = False) -> None:
    """Every rank calls this; the main process alone writes, then all meet at a barrier.

    Under DeepSpeed the fp32 master weights and each rank's optimizer partition are
    gathered first; every rank's RNG state is kept so a resumed rank continues its own.
    ``data`` is the data position (:func:`data_position`) and what it points into;
    ``compact`` stores the optimizer moments in bfloat16 (:func:`checkpoint.compact_state`).
    """
    master_weights = dist.full_spaf_weights(accelerator, module, model)
    optimizer_state = dist.optimizer_state(accelerator, optimizer)
    rng_states = dist.gather_to_main(accelerator, ckpt.rng_state())
    if accelerator.is_main_process:
        state = {
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng_states[0],
            "rng_per_rank": rng_states,
            "world_size": accelerator.num_processes,
        }
        if data is not None:
            state["data"] = data
        if compact:
            state = ckpt.compact_state(state)
        if master_weights is None:
            ckpt.save_checkpoint(run_dir, model, state, run_settings)
        else:
            ckpt.save_checkpoint(run_dir, model, state, run_settings, weights=master_weights)
    accelerator.wait_for_everyone()


def reduce_losses(accelerator, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    names = sorted(losses)
    stacked = torch.stack([losses[name].detach().float() for name in names])
    reduced = accelerator.reduce(stacked, "mean") if accelerator.num_processes > 1 else stacked
    return dict(zip(names, reduced.tolist()))


def short_name(name: str) -> str:
    """Progress-bar label: ``align_token_kl/15`` -> ``atk15``."""
    prefix, _, exit_layer = name.partition("/")
    labels = {"total": "loss", "adapter_kl": "akl", "adapter_ce": "ace", "align_state": "ast", "align_token_kl": "atk",
              "adapter_topk": "atop", "align_topk": "altop"}
    return labels.get(prefix, prefix) + exit_layer


class RunLog:
    """Appends one JSON object per line to ``train_log.jsonl`` (main process only).

    On resume, rows past the checkpoint's step (written before the interruption and
    about to be redone) are dropped first.
    """

    def __init__(self, run_dir: Path, enabled: bool, keep_until: int | None = None) -> None:
        self.path = run_dir / LOG_FILE
        self.enabled = enabled
        if enabled and keep_until is not None and self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_until:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def train_run(
    base_model: str | None,
    data_path: str | os.PathLike | None,
    run_dir: str | os.PathLike,
    overrides: dict[str, Any] | None = None,
    config: SpAFConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    distributed: DistributedSettings | None = None,
    init_from: str | os.PathLike | None = None,
) -> TrainResult:
    """What ``spaf-edge train`` does: load the base, build or restore SpAF modules, train.

    ``overrides`` are :class:`TrainSettings` values given by the user (the rest default).
    A fresh run refuses a run folder that already holds a checkpoint. A resumed run takes
    its SpAF config, settings and (unless given) data path from the checkpoint; overrides
    must then match the saved settings except for :data:`RESUMABLE_CHANGES`. The base is
    loaded once per process, in ``dtype`` or else ``distributed.base_dtype``. ``init_from``
    starts a fresh run (new optimizer and schedule) from trained components: their config,
    weights and draft vocabulary, e.g. to fine-tune them on new data; with it, ``config`` may
    only change the loss recipe (:data:`~spaf_edge.core.config.RECIPE_FIELDS`) of theirs.
    ``config`` is refused with ``resume`` (see :func:`check_run_start`).
    """
    check_run_start(resume, init_from, ("--config",) if config is not None and init_from is None else ())
    run_dir = Path(run_dir)
    overrides = dict(overrides or {})
    distributed = distributed or DistributedSettings()
    dtype = dtype or distributed.torch_base_dtype()
    if resume:
        checkpoint = resume_checkpoint(run_dir)
        saved = ckpt.load_checkpoint_settings(checkpoint)
        settings = resumed_settings(TrainSettings.from_dict(saved["train"]), overrides)
        data_path = data_path or saved_data_path(saved["data"], checkpoint)
        model = SpAFModel.from_pretrained(base_model, components=checkpoint / ckpt.COMPONENTS, dtype=dtype)
    else:
        if ckpt.find_checkpoint(run_dir) is not None:
            raise ConfigError(
                f"{run_dir} already holds a training checkpoint. Pass --resume to continue it, "
                "or choose a new --out folder."
            )
        if data_path is None:
            raise ConfigError("No training data: pass --data FILE.jsonl.")
        settings = TrainSettings.from_dict(overrides)
        torch.manual_seed(settings.seed)  # the SpAF modules' initial weights: the same in every process
        if init_from is not None:
            settings.init_from = ckpt.portable_path(init_from)
            model = SpAFModel.from_pretrained(base_model, components=init_from, dtype=dtype)
            if config is not None:
                model.config = recipe_of(model.config, config, model.num_layers, init_from)
        else:
            model = SpAFModel.from_pretrained(base_model, config or SpAFConfig(), dtype=dtype)
    return train(model, data_path, run_dir, settings, resume=resume, progress=progress, distributed=distributed)


def recipe_of(components: SpAFConfig, config: SpAFConfig, num_layers: int, source: str | os.PathLike) -> SpAFConfig:
    """``components`` (a loaded config, resolved for ``num_layers``) with the loss recipe of ``config``;
    other changes are refused."""
    changed = components.differs_beyond_recipe(config.resolved(num_layers))
    if changed:
        raise ConfigError(
            f"--init-from {source} keeps its components' modules: the config given changes {', '.join(changed)}. "
            "Change only the loss recipe, or start a new run without --init-from."
        )
    return components.replace(**{name: getattr(config, name) for name in RECIPE_FIELDS})


def saved_data_path(saved: str, checkpoint: Path) -> str:
    """The data file a resumed run recorded, when it is here; else an error naming the fix."""
    if Path(saved).is_file():
        return saved
    where = "" if Path(saved).is_absolute() else f" (relative to the current folder, {Path.cwd()})"
    raise ConfigError(
        f"{checkpoint} was trained on {saved}, which is not on this machine{where}. Pass --data with that "
        "file (a copy anywhere will do: its sequences are checked against the checkpoint's data position)."
    )


def resumed_settings(saved: TrainSettings, overrides: dict[str, Any]) -> TrainSettings:
    changed = [
        name for name, value in overrides.items()
        if name not in RESUMABLE_CHANGES and value != getattr(saved, name, None)
    ]
    if changed:
        raise ConfigError(
            f"--resume continues the saved run, but these settings differ from it: {', '.join(changed)}. "
            f"Drop them (only {', '.join(RESUMABLE_CHANGES)} may change), or start a new run."
        )
    settings = dataclasses.replace(saved, **overrides)
    settings.validate()
    return settings
