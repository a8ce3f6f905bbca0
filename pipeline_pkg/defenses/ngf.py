"""`ngf`: Natural Gradient Fine-tuning (Karim et al., "Efficient Backdoor Removal Through Natural Gradient
Fine-tuning").

Only one Linear layer is tuned — by default the classifier — and every other parameter is frozen (the
released code forgets to freeze them; here nothing else can move). The layer follows a K-FAC natural
gradient: with `a` the layer's input (a 1 appended for the bias) and `g` the gradient of log p(ŷ|x)
w.r.t. its output (pre-activation), ŷ drawn from the model's own softmax so the factors estimate the true
Fisher, the layer's Fisher block is approximated by A ⊗ G, A = E[a aᵀ], G = E[g gᵀ] (running averages
with decay `factor_decay`).

Damping convention: plain Tikhonov damping of the Kronecker product, (A ⊗ G + λI)⁻¹. With the factors'
eigendecompositions A = Q_A D_A Q_Aᵀ, G = Q_G D_G Q_Gᵀ this inverse is exact and cheap:
    (A ⊗ G + λI)⁻¹ vec(∇) = vec(Q_G [(Q_Gᵀ ∇ Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ),
so nothing is inverted explicitly; the eigendecompositions are recomputed every `inverse_every` steps
(K-FAC with eigen-decomposed factors, as in the released code's KFAC optimizer).

KL clipping: the step η·ν·v (v the preconditioned gradient) is scaled by ν = min(1, √(kl_clip / (η² ∇ᵀv))),
so its squared length in the damped-Fisher metric, η²ν²·∇ᵀv, is at most `kl_clip`. The clipped direction
then goes through SGD with momentum.

Loss = CE on the clean budget + η_r·Σ_j F_j(θ₀)(θ_j − θ₀,j)² over the tuned layer's parameters, the
Fisher-weighted retention term of `fisher.py`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..optim import SGD
from ..registry import DEFENSES
from ..runtime import autocast
from ..trainer import check_finite
from .base import Defense, freeze_all_but
from .fisher import diagonal_fisher, retention_penalty, sampled_log_likelihood


class KroneckerFactors:
    """Running K-FAC factors A = E[a aᵀ], G = E[g gᵀ] of one Linear layer, their eigendecompositions, and
    the damped natural-gradient direction. Kept in float64: the matrices are tiny (in+1 and out wide)."""

    def __init__(self, layer: nn.Linear, decay: float):
        self.bias = layer.bias is not None
        self.decay = decay
        self.A: torch.Tensor | None = None
        self.G: torch.Tensor | None = None
        self._eigen: tuple[torch.Tensor, ...] | None = None

    def update(self, a: torch.Tensor, g: torch.Tensor) -> None:
        """One batch: `a` the layer's inputs (…, in), `g` per-sample gradients w.r.t. its outputs (…, out)."""
        a = a.detach().reshape(-1, a.shape[-1]).double()
        g = g.detach().reshape(-1, g.shape[-1]).double()
        if self.bias:
            a = torch.cat([a, a.new_ones(len(a), 1)], 1)
        batch_A, batch_G = a.T @ a / len(a), g.T @ g / len(g)
        if self.A is None:  # the first batch starts the averages
            self.A, self.G = batch_A, batch_G
        else:
            self.A = self.decay * self.A + (1 - self.decay) * batch_A
            self.G = self.decay * self.G + (1 - self.decay) * batch_G

    def refresh(self) -> None:
        """Eigendecompose the current factors (used until the next refresh)."""
        d_A, Q_A = torch.linalg.eigh(self.A)
        d_G, Q_G = torch.linalg.eigh(self.G)
        # Both are PSD; clip the round-off negatives so the damped spectrum stays ≥ λ.
        self._eigen = (d_A.clamp(min=0), Q_A, d_G.clamp(min=0), Q_G)

    def precondition(self, grad: torch.Tensor, damping: float) -> torch.Tensor:
        """G⁻¹ ∇ A⁻¹ in the damped form (A ⊗ G + λI)⁻¹ vec(∇); `grad` is (out, in[+1]) with the bias
        gradient as the last column."""
        d_A, Q_A, d_G, Q_G = self._eigen
        rotated = Q_G.T @ grad.double() @ Q_A
        rotated = rotated / (d_G[:, None] * d_A[None, :] + damping)
        return (Q_G @ rotated @ Q_A.T).to(grad.dtype)


def sampled_output_grads(logits: torch.Tensor, output: torch.Tensor,
                         generator: torch.Generator) -> torch.Tensor:
    """Per-sample ∂ log p(ŷ|x) / ∂ output with ŷ ~ p(·|x): the `g` of the G factor. Each sample's
    log-likelihood depends only on its own row of `output`, so the gradient of their sum is per-sample."""
    log_lik = sampled_log_likelihood(logits, generator)
    return torch.autograd.grad(log_lik.sum(), output, retain_graph=True)[0]


@DEFENSES.register("ngf")
class NaturalGradientFineTuning(Defense):
    # damping 1e-2: at 1e-3 the retention gradient, which lies outside the directions the clean CE uses,
    # was amplified up to 1000x and the loss oscillated on the RF models instead of decreasing.
    method_defaults = {"steps": 300, "lr": 0.01, "momentum": 0.9, "damping": 1e-2, "kl_clip": 1e-3,
                       "factor_decay": 0.95, "inverse_every": 10, "eta_r": 1.0, "batch_size": 128,
                       "layer": "classifier"}

    def check_method(self) -> None:
        self.positive("steps", "lr", "damping", "kl_clip", "inverse_every", "batch_size")
        self.non_negative("momentum", "factor_decay", "eta_r")
        self.require(float(self.momentum) < 1, "momentum", "must be < 1")
        self.require(float(self.factor_decay) < 1, "factor_decay", "must be < 1")
        self.require(isinstance(self.layer, str) and self.layer != "", "layer",
                     "must name a Linear module ('classifier' or a dotted module name)")

    def tuned_layer(self, model: nn.Module) -> nn.Linear:
        try:
            layer = model.get_submodule(self.layer)
        except AttributeError:
            layer = None
        self.require(layer is not None, "layer", "names no module of the model")
        self.require(isinstance(layer, nn.Linear), "layer",
                     f"must name an nn.Linear module, not {type(layer).__name__}")
        return layer

    def purify(self, model, x, y, *, seed, log=lambda m, s: None):
        gen = torch.Generator().manual_seed(seed)
        layer = self.tuned_layer(model)
        params = [p for p in (layer.weight, layer.bias) if p is not None]
        was_trainable = [p.requires_grad for p in model.parameters()]
        freeze_all_but(model, params)
        self.tunable_parameters = sum(p.numel() for p in params)
        lr, kl_clip, damping = float(self.lr), float(self.kl_clip), float(self.damping)

        anchors = [p.detach().clone() for p in params]
        fisher = diagonal_fisher(model, x, params, gen) if float(self.eta_r) > 0 else None
        self.factors = factors = KroneckerFactors(layer, float(self.factor_decay))
        optimizer = SGD(params, lr=lr, momentum=float(self.momentum))
        batches = self.batches(x, y, seed)

        captured: dict[str, torch.Tensor] = {}

        def capture(module, inputs, output):
            captured["a"], captured["s"] = inputs[0].detach(), output
            # Hand on a copy, so an in-place activation after the layer cannot overwrite the
            # pre-activation output whose gradient the G factor needs.
            return output.clone()

        handle = layer.register_forward_hook(capture)
        self.train_mode(model)
        try:
            for step in range(int(self.steps)):
                xb, yb = next(batches)
                with autocast(x.device):
                    logits = model(xb)
                    ce = F.cross_entropy(logits, yb)
                    loss = ce
                    if fisher is not None:
                        loss = loss + float(self.eta_r) * retention_penalty(params, anchors, fisher)
                check_finite(loss, f"{self.name} step {step}")
                factors.update(captured["a"], sampled_output_grads(logits, captured["s"], gen))
                if step % int(self.inverse_every) == 0:
                    factors.refresh()

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad = layer.weight.grad
                if layer.bias is not None:
                    grad = torch.cat([grad, layer.bias.grad[:, None]], 1)
                direction = factors.precondition(grad, damping)
                # KL clipping: η²ν²·∇ᵀv ≤ kl_clip; a zero gradient gives inf → ν = 1.
                nu = torch.sqrt(kl_clip / (lr ** 2 * (direction * grad).sum())).clamp(max=1.0)
                layer.weight.grad = nu * direction[:, :layer.in_features]
                if layer.bias is not None:
                    layer.bias.grad = nu * direction[:, -1]
                optimizer.step()
                if step % int(self.log_every) == 0:
                    log({"loss": loss.item(), "ce": ce.item(), "kl_scale": nu.item()}, step)
        finally:
            handle.remove()
            for p, flag in zip(model.parameters(), was_trainable):
                p.requires_grad_(flag)
        return self.finish(model)
