"""SGD, Adam and AdamW and the two learning-rate schedules the pipeline uses, with torch.optim's update
formulas and state-dict layout.

Why not torch.optim: every pipeline job is its own process, and torch.optim's `Optimizer.step` (and
several other methods) import torch._dynamo on first use, which costs 1.1-1.5 s per job (sympy, fx, ...)
for a compiler we never use; about 52 optimizer-creating jobs in a default run spent a minute of CPU on
it. These classes use only tensor ops (`torch._foreach_*`, which on CPU run the same per-tensor kernels as
torch's single-tensor path and on GPU the same fused kernels as its foreach path), so results match
torch.optim's step for step.

State dicts hold only tensors, numbers, lists and dicts, so checkpoints load with
`torch.load(weights_only=True)`; their layout is torch's ({"state": {index: {...}}, "param_groups":
[{..., "params": [indices]}]}), so a checkpoint written by torch.optim's counterpart also loads.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "LRSchedule", "LambdaLR", "CosineAnnealingLR"]


class Optimizer:
    """Parameter groups, per-parameter state, zero_grad, (de)serialisation and the step loop over groups;
    subclasses add `_update`, one group's update."""

    defaults: dict[str, Any]

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], defaults: dict[str, Any]) -> None:
        self.defaults = defaults
        groups = list(params)
        if not groups:
            raise ValueError(f"{type(self).__name__} got an empty parameter list; pass the parameters to optimise")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for group in groups:
            group = {**defaults, **group, "params": list(group["params"])}
            for p in group["params"]:
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"{type(self).__name__} optimises tensors, got {type(p).__name__}")
                if id(p) in seen:
                    # The same tensor in two groups would get two updates per step.
                    raise ValueError(f"{type(self).__name__}: a parameter appears more than once; pass each once")
                seen.add(id(p))
            self.param_groups.append(group)
        # Keyed by the parameter tensor itself, as in torch.optim.
        self.state: dict[torch.Tensor, dict[str, Any]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().requires_grad_(False).zero_()

    def state_dict(self) -> dict[str, Any]:
        """{"state": {index: {name: tensor or number}}, "param_groups": [{option: value, "params":
        [index, ...]}]}, indices counting parameters across groups in order. Tensors are not copied
        (as in torch.optim): serialise the result before the next step."""
        index: dict[int, int] = {}
        packed_groups = []
        for group in self.param_groups:
            packed = {k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k != "params"}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
            packed_groups.append(packed)
        state = {index[id(p)]: dict(values) for p, values in self.state.items()}
        return {"state": state, "param_groups": packed_groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore groups' options and per-parameter state from `state_dict()` output (ours or
        torch.optim's counterpart's); tensors are copied onto each parameter's device."""
        name = type(self).__name__
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the saved state has {len(saved_groups)} parameter groups, "
                             f"this optimizer {len(self.param_groups)}; build it with the same parameter groups")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}.load_state_dict: parameter group {i} was saved with "
                                 f"{len(saved['params'])} parameters, this optimizer has {len(group['params'])}; "
                                 f"build it for the same model")
        saved_state = state_dict["state"]
        self.state = {}
        for saved, group in zip(saved_groups, self.param_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if isinstance(self.defaults.get(key), tuple) else value
            for saved_index, p in zip(saved["params"], group["params"]):
                if saved_index in saved_state:
                    self.state[p] = {key: self._restore(key, value, p)
                                     for key, value in saved_state[saved_index].items()}

    @staticmethod
    def _restore(key: str, value: Any, param: torch.Tensor) -> Any:
        if key == "step":  # torch.optim stores the step count as a tensor; we keep an int
            return int(value)
        if isinstance(value, torch.Tensor):
            # A copy, so later steps never write into the caller's state dict.
            return value.detach().to(device=param.device, dtype=param.dtype, copy=True)
        return value

    @torch.no_grad()
    def step(self) -> None:
        """One update of every group's parameters that have a gradient."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params, [p.grad for p in params])

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """torch.optim.SGD's update (dampening 0): g += wd·p; buf = g on the first step, else
    buf = momentum·buf + g; d = g + momentum·buf (nesterov) or buf; p -= lr·d."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr={lr}, momentum={momentum}, weight_decay={weight_decay} must all be >= 0")
        if nesterov and momentum == 0:
            raise ValueError("SGD: nesterov=True needs a momentum > 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": weight_decay})

    def _update(self, group, params, grads) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if momentum != 0:
            buffers = [self.state.setdefault(p, {}).get("momentum_buffer") for p in params]
            continuing = [i for i, buf in enumerate(buffers) if buf is not None]
            if continuing:
                torch._foreach_mul_([buffers[i] for i in continuing], momentum)
                torch._foreach_add_([buffers[i] for i in continuing], [grads[i] for i in continuing])
            for i, buf in enumerate(buffers):
                if buf is None:  # torch's first step: the buffer starts as the gradient itself
                    buffers[i] = self.state[params[i]]["momentum_buffer"] = grads[i].detach().clone()
            if group["nesterov"]:
                # Out of place: p.grad must stay the gradient (torch's single-tensor path leaves it).
                grads = torch._foreach_add(grads, buffers, alpha=momentum)
            else:
                grads = buffers
        torch._foreach_add_(params, grads, alpha=-lr)


class Adam(Optimizer):
    """torch.optim.Adam's update (amsgrad off); `decoupled_weight_decay` gives AdamW's
    p *= 1 - lr·wd instead of adding wd·p to the gradient."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False) -> None:
        name = type(self).__name__
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"{name}: lr={lr}, eps={eps}, weight_decay={weight_decay} must all be >= 0")
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"{name}: betas={betas} must both be in [0, 1)")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "decoupled_weight_decay": decoupled_weight_decay})

    def _update(self, group, params, grads) -> None:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = []
        for p in params:
            state = self.state.setdefault(p, {})
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                             exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            state["step"] += 1
            states.append(state)
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        if weight_decay != 0:
            if group["decoupled_weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * weight_decay)
            else:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        # Bias corrections in Python floats, in torch's order of operations.
        step_sizes = [-(lr / (1 - beta1 ** s["step"])) for s in states]
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [(1 - beta2 ** s["step"]) ** 0.5 for s in states])
        torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 0.01, as torch's)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay=True)


class LRSchedule:
    """Sets every group's lr to `lr_at(base_lr, t)`, t counting `step()` calls from 0 (set on
    construction), base_lr being the group's lr when the schedule was built."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def lr_at(self, base_lr: float, t: int) -> float:
        raise NotImplementedError

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def _apply(self) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.lr_at(base_lr, self.last_epoch)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position (a torch scheduler's state dict also works). Like torch, the groups' lr
        is left alone: it comes back with the optimizer's own state dict."""
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = [float(lr) for lr in state_dict["base_lrs"]]


class LambdaLR(LRSchedule):
    """torch.optim.lr_scheduler.LambdaLR: lr = base_lr · factor(t)."""

    def __init__(self, optimizer: Optimizer, factor: Callable[[int], float]) -> None:
        self.factor = factor
        super().__init__(optimizer)

    def lr_at(self, base_lr: float, t: int) -> float:
        return base_lr * self.factor(t)


class CosineAnnealingLR(LRSchedule):
    """torch.optim.lr_scheduler.CosineAnnealingLR in closed form,
    lr = eta_min + (base_lr - eta_min)(1 + cos(π t / T_max)) / 2; torch's recursive form reaches the
    same values up to rounding (relative differences ~1e-16)."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0) -> None:
        self.T_max, self.eta_min = int(T_max), float(eta_min)
        super().__init__(optimizer)

    def lr_at(self, base_lr: float, t: int) -> float:
        if t == 0:  # also defined for T_max = 0 (a zero-step run), as torch's is
            return base_lr
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.T_max)) / 2
