"""`fast_fip`: Fisher Information guided Purification restricted to the weights' singular values.

The objective is fip's — loss = CE + η_F·Tr(F) + η_r·Σ_j F_j(δ₀)(δ_j − δ₀,j)² — but instead of
every weight, only a per-singular-value shift is trained. Each Conv (1-D/2-D/3-D) and Linear weight W,
reshaped to (out, in·k…), is factored once by SVD, W = U diag(S) Vᵀ; U, S and V are frozen and the
layer uses W' = U diag(ReLU(S + δ)) Vᵀ with δ initialised to 0, so the singular vectors never move and
a layer has min(out, in·k) tunable values. Biases and normalisation-layer parameters stay frozen (their
running statistics follow `bn_stats` as in every defense). The retention term's anchors and diagonal
Fisher are those of δ at 0, i.e. of the starting weights.

The factorisation is attached with `torch.nn.utils.parametrize` to each module's `weight`, so the
defense needs no per-architecture code and no model copy; at the end the parametrizations are removed
with `leave_parametrized=True`, leaving a plain state dict with the keys the model had before."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..registry import DEFENSES
from .fip import FisherInformationPurification

FACTORED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class SpectralShift(nn.Module):
    """W' = U diag(ReLU(S + δ)) Vᵀ reshaped to the weight's shape; U, S, V frozen buffers, δ trained.

    The weight it is registered on is ignored in `forward` (it stays as the frozen
    `parametrizations.weight.original` until the parametrization is removed)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.shape = tuple(weight.shape)
        matrix = weight.detach().reshape(weight.shape[0], -1)
        # float64 SVD, stored in the weight's dtype: the most accurate factors that dtype can hold.
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        self.register_buffer("U", u.to(weight.dtype))
        self.register_buffer("S", s.to(weight.dtype))
        self.register_buffer("V", vh.T.contiguous().to(weight.dtype))
        self.delta = nn.Parameter(torch.zeros_like(self.S))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # Rebuild in full precision even under bf16 autocast; the layer casts the result itself.
        with torch.autocast(self.U.device.type, enabled=False):
            matrix = (self.U * torch.relu(self.S + self.delta)) @ self.V.T
        return matrix.reshape(self.shape)


def _shift(module: nn.Module) -> SpectralShift | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations["weight"] if isinstance(p, SpectralShift)), None)


def factorize(model: nn.Module) -> list[nn.Parameter]:
    """Attach a SpectralShift to the weight of every Conv/Linear module of `model` (in place; modules
    already factored are left as they are) and return the δ parameters in module order. Outputs are
    unchanged up to the SVD's round-off while every δ is 0."""
    deltas = []
    for module in list(model.modules()):
        if not isinstance(module, FACTORED):
            continue
        shift = _shift(module)
        if shift is None:
            shift = SpectralShift(module.weight)
            # Removing a parametrization re-adds `weight` after `bias`; remember the order to restore.
            shift.parameter_order = list(module._parameters)
            parametrize.register_parametrization(module, "weight", shift)
        deltas.append(shift.delta)
    return deltas


def bake(model: nn.Module) -> nn.Module:
    """Write each factored weight's current value W' into the plain `weight` parameter and remove the
    parametrizations: the state dict has exactly the keys, in the same order, it had before
    `factorize`, and the `weight` parameter objects are the original ones (updated in place)."""
    for module in list(model.modules()):
        shift = _shift(module)
        if shift is None:
            continue
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        params = module._parameters
        order = [n for n in shift.parameter_order if n in params]
        for name in order + [n for n in params if n not in order]:
            params[name] = params.pop(name)
    return model


@DEFENSES.register("fast_fip")
class FastFisherInformationPurification(FisherInformationPurification):
    method_defaults = dict(FisherInformationPurification.method_defaults)

    def trainable(self, model: nn.Module) -> list[torch.Tensor]:
        """The singular-value shifts δ, factoring the model's Conv/Linear weights on first call."""
        return factorize(model)

    def purify(self, model, x, y, *, seed, log=lambda m, s: None):
        try:
            model = super().purify(model, x, y, seed=seed, log=log)
        finally:
            # Also on failure (e.g. a non-finite loss), so the caller never gets a parametrized model.
            bake(model)
            for p in model.parameters():
                p.requires_grad_(True)
        return model
