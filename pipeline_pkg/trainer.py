"""The one trainer: data resident on the device, bf16 autocast on GPU, deterministic on CPU, a checkpoint
every epoch that a restarted job resumes, and a clear error on a NaN loss."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .augment import augmenter
from .configurable import Configurable
from .h5io import load_checkpoint, save_checkpoint
from .optim import SGD, AdamW, LambdaLR, Optimizer
from .runtime import autocast, epoch_order, minibatches

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainSettings(Configurable):
    kind = "train"
    defaults = {
        "epochs": 12,
        "batch_size": 128,
        "lr": 0.01,
        "weight_decay": 5e-4,
        "optimizer": "adamw",
        "label_smoothing": 0.0,
        "device": "auto",
        # Test ACC/ASR after every this many epochs (and after the last) for the logged curves.
        "eval_every": 1,
    }

    def check(self) -> None:
        self.require(int(self.epochs) > 0, "epochs", "must be a positive integer")
        self.require(int(self.batch_size) > 0, "batch_size", "must be a positive integer")
        self.require(int(self.eval_every) > 0, "eval_every", "must be a positive integer")
        self.require(float(self.lr) > 0, "lr", "must be positive")
        self.require(self.optimizer in ("sgd", "adamw"), "optimizer", "must be 'sgd' or 'adamw'")
        self.require(0 <= float(self.label_smoothing) < 1, "label_smoothing", "must be in [0, 1)")


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_optimizer(params, settings: TrainSettings) -> Optimizer:
    if settings.optimizer == "sgd":
        return SGD(params, lr=float(settings.lr), momentum=0.9, nesterov=True,
                   weight_decay=float(settings.weight_decay))
    return AdamW(params, lr=float(settings.lr), weight_decay=float(settings.weight_decay))


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"{where}: the loss became {loss.item()}; lower the learning rate "
                               f"or check the input data for NaNs")


def guarded_step(optimizer: Optimizer, loss: torch.Tensor, where: str,
                 inputs: Sequence[torch.Tensor] | None = None, max_grad_norm: float | None = None,
                 grads: Sequence[torch.Tensor] | None = None) -> torch.Tensor | None:
    """One optimizer step on `loss` (its gradient only for `inputs` when given, its norm over the
    optimizer's parameters clipped to `max_grad_norm` when set), refusing a NaN or infinite loss with
    a message naming `where`. A caller that took the gradient term by term passes it as `grads` (one per
    tensor of `inputs`), and `loss` is then only checked. Returns the gradient norm before clipping (a
    tensor, so a GPU need not wait for it), or None without clipping."""
    check_finite(loss, where)
    optimizer.zero_grad(set_to_none=True)
    if grads is None:
        loss.backward(inputs=None if inputs is None else list(inputs))
    else:
        for p, g in zip(inputs, grads, strict=True):
            p.grad = g
    norm = None
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, float(max_grad_norm))
    optimizer.step()
    return norm


def warmup_then_decay(optimizer: Optimizer, total_steps: int, warmup_share: float = 0.25) -> LambdaLR:
    """One-cycle-shaped schedule: linear warm-up to the base learning rate over the first quarter, then
    linear decay to zero; defined for any number of steps (torch's OneCycleLR fails on some short runs)."""
    warmup = max(1, round(warmup_share * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return LambdaLR(optimizer, factor)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: TrainSettings, *, seed: int,
        checkpoint: str | Path | None = None, resume_key: str = "", augment: Sequence[str] = (),
        on_epoch: Callable[[int, dict], None] | None = None) -> nn.Module:
    """Train `model` in place on device-resident (x, y); returns it in eval mode. `augment` names
    batched device augmentations (pipeline_pkg.augment) applied to every training batch.

    With `checkpoint`, the state after every epoch is saved there and a restarted job resumes from it,
    but only if it was written for the same `resume_key` (a hash of the job's settings), so a changed
    config never resumes a stale run."""
    device = x.device
    epochs, batch_size = int(settings.epochs), int(settings.batch_size)
    optimizer = make_optimizer(model.parameters(), settings)
    steps_per_epoch = -(-len(x) // batch_size)
    scheduler = warmup_then_decay(optimizer, epochs * steps_per_epoch)
    start_epoch = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)
        if state.get("resume_key") == resume_key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"]) + 1
            log.info("resumed from %s after epoch %d", checkpoint, start_epoch)
        else:
            log.info("ignoring checkpoint %s: written for other settings", checkpoint)

    smoothing = float(settings.label_smoothing)
    # Tensor cores want NHWC for convolutions; the model converts uint8 input keeping its layout.
    channels_last = device.type == "cuda" and x.ndim == 4
    if channels_last:
        model.to(memory_format=torch.channels_last)
    for epoch in range(start_epoch, epochs):
        model.train()
        started, total_loss, correct = time.perf_counter(), 0.0, 0
        order = epoch_order(len(x), seed, epoch, device)
        # Seeded from (seed, epoch) like the order, so a resumed epoch sees the same augmentations.
        augment_batch = augmenter(augment, device, seed * 100_003 + epoch + 50_021) if augment else None
        bar = tqdm(minibatches(x, y, batch_size, order, training=True), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{epochs}", mininterval=5, leave=False)
        for xb, yb in bar:
            if augment_batch is not None:
                xb = augment_batch(xb)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                logits = model(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=smoothing)
            guarded_step(optimizer, loss, f"training epoch {epoch + 1}")
            scheduler.step()
            total_loss += loss.detach() * len(xb)
            correct += (logits.detach().argmax(1) == yb).sum()
        metrics = {"train_loss": float(total_loss) / len(x), "train_acc": float(correct) / len(x),
                   "epoch_seconds": time.perf_counter() - started}
        log.info("epoch %d/%d %s", epoch + 1, epochs, {k: round(v, 4) for k, v in metrics.items()})
        if checkpoint is not None:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch,
                             "resume_key": resume_key}, checkpoint)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return model.eval()
