"""The one training loop for every trainable head, on cached features.

Adam, shuffled mini-batches from a seeded generator, validation loss after every
epoch, early stopping with patience, and the best weights restored from a *copy*
(the papers' code kept live references, so "best" was overwritten by later epochs).

With a ``select`` function (higher is better; vitqc passes the localization proxy on
synthetic defects, ``vitqc.data.proxy``) the best epoch is the one it rates highest,
the starting point (epoch 0) included, and patience counts epochs without a better
rating: a lower NLL is not always a better detector. The validation loss is then computed
once, for the kept weights (per epoch it cost about a tenth of the training time).

Steps run on ``head.fixed_inputs`` of the features (through the head's fitted
standardization), computed once before the first epoch, and ``head.input_loss``. A head
that allows it (``Head.mixed_precision``) trains with its products in bfloat16
(``torch.autocast``, float32 weights and optimizer) where the CPU computes bfloat16
natively; validation, ratings and inference stay float32.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from vitqc.cpu import native_bfloat16
from vitqc.heads.base import Head


@dataclass
class TrainConfig:
    epochs: int = 500
    patience: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    progress: bool = True
    #: Wall-clock budget: stop after the epoch that reaches it (best weights restored).
    max_minutes: float | None = None
    #: Batches per epoch, drawn from one shuffled pass over the training set after
    #: another (Keras's ``steps_per_epoch``); None: an epoch is one pass. Shorter epochs
    #: rate (or validate) more often, so training stops sooner after its best.
    steps_per_epoch: int | None = None
    #: "auto": bfloat16 where the head allows it and the CPU computes it natively
    #: (``native_bfloat16``), else float32; or "float32" / "bfloat16" (the latter only
    #: for a head that allows it)
    precision: str = "auto"


PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class TrainResult:
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    seconds: float
    stopped: str = "epochs"  # "epochs", "patience" or "time"
    #: (train loss, validation loss) per epoch, plus the selection rating when used
    history: list[tuple[float, ...]] = field(default_factory=list)
    #: rating of the kept weights by ``select`` (None: chosen by validation loss)
    best_rating: float | None = None
    initial_rating: float | None = None
    #: the precision the training steps ran in ("float32" or "bfloat16")
    precision: str = "float32"


def training_precision(head: nn.Module, precision: str) -> str:
    """The precision ``train_head`` runs ``head``'s steps in, for ``TrainConfig.precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    allowed = getattr(head, "mixed_precision", False)
    if precision == "bfloat16" and not allowed:
        name = getattr(head, "name", type(head).__name__)
        raise ValueError(f"the {name} head does not train in bfloat16")
    if precision == "auto":
        return "bfloat16" if allowed and native_bfloat16() else "float32"
    return precision


def _batches(features: list[torch.Tensor], batch_size: int, order: torch.Tensor | None = None):
    n = features[0].shape[0]
    idx = order if order is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        take = idx[start : start + batch_size]
        yield [f[take] for f in features]


def _epochs(
    features: list[torch.Tensor],
    batch_size: int,
    generator: torch.Generator,
    steps_per_epoch: int | None,
):
    """The batches of each epoch: ``steps_per_epoch`` batches (default: a pass's worth)
    from shuffled passes one after another (a pass's last batch may be smaller)."""
    n = features[0].shape[0]
    steps = steps_per_epoch or math.ceil(n / batch_size)

    def passes():
        while True:
            yield from _batches(features, batch_size, torch.randperm(n, generator=generator))

    stream = passes()
    while True:
        yield (next(stream) for _ in range(steps))


def has_fixed_inputs(head: nn.Module) -> bool:
    """Whether ``head`` has a part training leaves unchanged (``Head.fixed_inputs``)."""
    return getattr(type(head), "fixed_inputs", Head.fixed_inputs) is not Head.fixed_inputs


@torch.no_grad()
def fixed_inputs(head: nn.Module, features: list[torch.Tensor], batch_size: int = 64):
    """``head.fixed_inputs`` of every image, computed in batches into one tensor per
    layer: what training steps on (the features themselves, not copied, for a head
    whose fixed part is nothing)."""
    if not has_fixed_inputs(head):
        return features
    head.eval()
    out: list[torch.Tensor] = []
    for start in range(0, features[0].shape[0], batch_size):
        part = head.fixed_inputs([f[start : start + batch_size] for f in features])
        if not out:
            out = [p.new_empty((features[0].shape[0], *p.shape[1:])) for p in part]
        for layer, p in zip(out, part, strict=True):
            layer[start : start + p.shape[0]] = p
    return out


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, features: list[torch.Tensor], batch_size: int, from_inputs: bool = False
) -> float:
    """Mean loss per image of ``features`` (``from_inputs``: already ``fixed_inputs``)."""
    model.eval()
    total, count = 0.0, 0
    for batch in _batches(features, batch_size):
        n = batch[0].shape[0]
        loss = model.input_loss(batch) if from_inputs else model.loss(batch)
        total += float(loss) * n
        count += n
    return total / max(count, 1)


def train_head(
    head: nn.Module,
    train_features: list[torch.Tensor],
    val_features: list[torch.Tensor] | None,
    config: TrainConfig,
    select: Callable[[], float] | None = None,
) -> TrainResult:
    """Fit ``head`` by its own ``loss``; keep the epoch with the lowest validation loss,
    or the highest ``select()`` rating when given (called with the head in eval mode
    after every epoch, and once before training); stop when it stalls. Without
    validation features (and ``select``) it trains ``config.epochs`` epochs and keeps the
    last: a fixed budget, as for the out-of-fold models (``vitqc.folds``)."""
    if val_features is None and select is not None:
        raise ValueError("selection needs validation features")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.steps_per_epoch is not None and config.steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be 1 or more, got {config.steps_per_epoch}")
    precision = training_precision(head, config.precision)
    bfloat16 = precision == "bfloat16"
    # the part training leaves unchanged (the fitted standardization), once, not per step
    train_inputs = fixed_inputs(head, train_features)
    val_inputs = None if val_features is None else fixed_inputs(head, val_features)
    best_state = copy.deepcopy(head.state_dict())
    best_loss, best_epoch, history = math.inf, 0, []
    start = time.perf_counter()
    initial_rating = best_rating = None
    fixed = val_features is None
    if select is not None:  # the validation loss only of the kept weights, at the end
        head.eval()
        initial_rating = best_rating = float(select())
    bar = tqdm(
        range(1, config.epochs + 1),
        desc=f"train {getattr(head, 'name', 'head')}",
        unit="epoch",
        disable=not config.progress,
        leave=False,
    )
    epoch, stopped = 0, "epochs"
    epochs = _epochs(train_inputs, config.batch_size, generator, config.steps_per_epoch)
    for epoch, batches in zip(bar, epochs, strict=False):  # the epochs never end
        head.train()
        running, seen = 0.0, 0
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                loss = head.input_loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {float(loss)} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach()) * batch[0].shape[0]
            seen += batch[0].shape[0]
        train_loss = running / seen
        val_loss = (
            math.nan
            if fixed or select is not None
            else evaluate_loss(head, val_inputs, config.batch_size, from_inputs=True)
        )
        if fixed:
            history.append((train_loss, val_loss))
            improved = True
        elif select is None:
            history.append((train_loss, val_loss))
            improved = val_loss < best_loss
        else:
            rating = float(select())
            history.append((train_loss, val_loss, rating))
            improved = rating > best_rating
            if improved:
                best_rating = rating
        if improved:
            best_loss, best_epoch = val_loss, epoch
            if not fixed:  # a fixed budget keeps the last weights: nothing to restore
                best_state = copy.deepcopy(head.state_dict())
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=best_epoch)
        if epoch - best_epoch >= config.patience:
            stopped = "patience"
            break
        if (
            config.max_minutes is not None
            and time.perf_counter() - start >= 60 * config.max_minutes
        ):
            stopped = "time" if epoch < config.epochs else "epochs"
            break
    bar.close()
    if not fixed:
        head.load_state_dict(best_state)
    head.eval()
    if select is not None:
        best_loss = evaluate_loss(head, val_inputs, config.batch_size, from_inputs=True)
    seconds = time.perf_counter() - start
    return TrainResult(
        best_epoch,
        best_loss,
        epoch,
        seconds,
        stopped,
        history,
        best_rating,
        initial_rating,
        precision,
    )
