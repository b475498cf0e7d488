"""What both training backends share: the learning-rate schedule, the frozen layers, the epoch
loop and its per-epoch log."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import optax
from tqdm import tqdm

from nequix_fw.errors import ModelError
from nequix_fw.settings import TrainingSettings


def learning_rate_schedule(settings: TrainingSettings, steps_per_epoch: int):
    """Learning rate per optimiser step: linear warm-up from 0.1 x `learning_rate` over
    `warmup_epochs`, then cosine decay to `min_learning_rate` (optax's schedule)."""
    return _schedule(
        settings.learning_rate,
        settings.min_learning_rate,
        max(int(settings.warmup_epochs * steps_per_epoch), 1),
        settings.epochs * steps_per_epoch,
    )


@functools.lru_cache(maxsize=8)
def _schedule(lr: float, min_lr: float, warmup: int, total: int):
    return optax.warmup_cosine_decay_schedule(
        init_value=lr * 0.1,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=max(total, warmup + 1),
        end_value=min_lr,
    )


def frozen_layers(freeze: str | int, n_layers: int, where: str) -> int:
    """How many of a model's `n_layers` interaction layers `freeze` (`TrainingSettings.freeze`)
    keeps as they are (`where` names the model in errors)."""
    k = {"none": 0, "backbone": n_layers}[freeze] if isinstance(freeze, str) else freeze
    if k > n_layers:
        raise ModelError(
            f"train_ensemble.freeze: {k} layers, but {where} has {n_layers} interaction "
            f"layers: freeze 0 to {n_layers}, 'backbone' or 'none'"
        )
    return k


class EpochLog:
    """Per-epoch bookkeeping shared by both backends: the training curve, the best model by
    validation loss, early stopping."""

    def __init__(self, member: int, patience: int | None):
        self.member, self.patience = member, patience
        self.rows: list[dict] = []
        self.best_loss, self.best_model, self.best_epoch, self.best_val = float("inf"), None, -1, {}

    def update(
        self,
        epoch: int,
        train_loss: float,
        val: dict,
        learning_rate: float,
        seconds: float,
        snapshot,
    ) -> bool:
        """Record an epoch (`snapshot()` gives the model to keep if it is the best so far);
        True when training should stop."""
        if not np.isfinite(val["loss"]):
            raise ModelError(f"member {self.member}: loss became non-finite at epoch {epoch}")
        if val["loss"] < self.best_loss:
            self.best_loss, self.best_model, self.best_epoch, self.best_val = (
                val["loss"],
                snapshot(),
                epoch,
                val,
            )
        self.rows.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "learning_rate": learning_rate,
                "epoch_s": seconds,
                **{f"val_{k}": v for k, v in val.items()},
            }
        )
        return self.patience is not None and epoch - self.best_epoch >= self.patience

    def result(self) -> tuple:
        return self.best_model, self.best_epoch, self.best_val, self.rows


def run_epochs(
    plan,
    settings: TrainingSettings,
    batches: Callable[[np.ndarray], Iterable],
    step: Callable[[Any, int], float],
    validate: Callable[[], dict | None],
    snapshot: Callable[[], Any],
    desc: str,
    progress: bool,
) -> tuple:
    """The epoch loop of both backends. Each epoch shuffles `plan.train_idx` (seeded by
    `plan.seed`), takes one optimiser step per batch (`step(batch, i)` with `batches(order)`
    and the global step i; it returns the batch's loss), then `validate()` (None: the
    training loss stands in) and the log, which keeps `snapshot()` of the best epoch and stops
    early after `settings.patience` epochs without a better validation loss. Returns
    `EpochLog.result()`."""
    train_idx = np.array(plan.train_idx)
    rng = np.random.default_rng(plan.seed)
    steps_per_epoch = max(1, -(-len(train_idx) // settings.batch_size))
    schedule = learning_rate_schedule(settings, steps_per_epoch)
    log = EpochLog(plan.index, settings.patience)
    i = 0
    bar = tqdm(range(settings.epochs), desc=desc, disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        train_loss = 0.0
        for batch in batches(rng.permutation(train_idx)):
            train_loss += step(batch, i)
            i += 1
        train_loss /= steps_per_epoch
        val = validate() or {"loss": train_loss}
        bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val['loss']:.4g}")
        if log.update(
            epoch, train_loss, val, float(schedule(i)), time.perf_counter() - t0, snapshot
        ):
            break
    bar.close()
    return log.result()
