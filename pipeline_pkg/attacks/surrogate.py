"""What the learned-trigger image attacks share: a surrogate classifier trained on the data to poison (the
attacker's stand-in for the victim), seeded local randomness, shuffled device minibatches, a small conv
encoder–decoder for trigger generators, and the base class that keeps a learned trigger's nets, saves
them as flat arrays for the poison file and rebuilds them from those arrays."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import Classifier
from ..optim import Optimizer
from ..registry import MODELS
from ..runtime import epoch_order, pick_device
from ..trainer import TrainSettings, fit, guarded_step
from .image_base import ImageAttack, to_unit

# Arrays saved beside a trigger's weights: the (C, H, W) shape its nets were built for.
INPUT_SHAPE = "input_shape"


def fit_device() -> torch.device:
    return pick_device("auto")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch randomness inside the block (initialisation, sampling) fixed by `seed`; the global state is
    restored afterwards, so fitting an attack does not shift the seeds of the jobs around it."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def unit_tensors(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images as floats in [0, 1] and labels, on the device."""
    return to_unit(torch.from_numpy(x).to(device)), torch.from_numpy(y).to(device)


def build_surrogate(input_shape: Sequence[int], num_classes: int, width: int) -> Classifier:
    return MODELS.get("resnet9")(width=int(width)).build(list(input_shape), num_classes)


def train_surrogate(x: np.ndarray, y: np.ndarray, num_classes: int, seed: int, epochs: int,
                    width: int = 8, lr: float = 0.01, batch_size: int = 128) -> Classifier:
    """A ResNet-9 of `width` trained on the clean uint8 images (x, y) with the pipeline's trainer;
    returned frozen in eval mode, ready for gradients with respect to its input."""
    device = fit_device()
    with seeded(seed):
        model = build_surrogate(x.shape[1:], num_classes, width).to(device)
    settings = TrainSettings(epochs=int(epochs), batch_size=batch_size, lr=lr)
    fit(model, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), settings, seed=seed)
    return model.requires_grad_(False).eval()


def shuffled_batches(tensors: Sequence[torch.Tensor], epochs: int, batch_size: int,
                     seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Minibatches of aligned device tensors over `epochs` epochs, each epoch in a seeded order."""
    for epoch in range(int(epochs)):
        order = epoch_order(len(tensors[0]), seed, epoch, tensors[0].device)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield tuple(t[idx] for t in tensors)


def optimiser_step(optimizer: Optimizer, loss: torch.Tensor, attack: ImageAttack,
                   inputs: Sequence[torch.Tensor] | None = None) -> None:
    """One guarded step of fitting `attack`'s trigger (trainer.guarded_step)."""
    guarded_step(optimizer, loss, f"attack {attack.name!r}: fitting the trigger", inputs)


def target_tensor(attack: ImageAttack, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The attack's target label for each label in `y` (all-to-one or all-to-all), on y's device."""
    return torch.from_numpy(attack.target_labels(y.cpu().numpy(), num_classes)).to(y.device)


def in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               batch_size: int = 1024) -> torch.Tensor:
    """fn over x in slices without gradients: bounded memory however large the batch handed in."""
    if not len(x):
        return x.clone()
    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def pairwise_diversity(x: torch.Tensor, x_other: torch.Tensor, out: torch.Tensor,
                       out_other: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ‖x − x'‖ / ‖g(x) − g(x')‖ (Input-aware's diversity loss): small when
    different inputs get different outputs, so minimising it keeps a generator from collapsing."""
    dist_in = (x - x_other).flatten(1).pow(2).mean(1).sqrt()
    dist_out = (out - out_other).flatten(1).pow(2).mean(1).sqrt()
    return (dist_in / (dist_out + 1e-3)).mean()


def conv_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU(inplace=True))


class ConvEncoderDecoder(nn.Module):
    """Image-to-image generator: two stride-2 stages down, back up by interpolation, with a skip of the
    full-resolution features so the output can depend on the image's details. No batch norm: a trigger
    must not depend on which other images share its batch. Raw output, any real value."""

    def __init__(self, in_channels: int, out_channels: int, width: int):
        super().__init__()
        w = int(width)
        self.stem = conv_relu(in_channels, w)
        self.down = nn.Sequential(conv_relu(w, 2 * w, stride=2), conv_relu(2 * w, 4 * w, stride=2))
        self.up_half = conv_relu(4 * w, 2 * w)
        self.up_full = conv_relu(2 * w, w)
        self.head = nn.Conv2d(2 * w, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.stem(x)
        h = self.down(skip)
        half = ((skip.shape[-2] + 1) // 2, (skip.shape[-1] + 1) // 2)
        h = self.up_half(F.interpolate(h, size=half, mode="nearest"))
        h = self.up_full(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
        return self.head(torch.cat([h, skip], dim=1))


class LearnedImageAttack(ImageAttack):
    """An image attack whose trigger lives in nets learned by `fit`. Subclasses build the nets for an
    input shape (`build_nets`) and train them; saving, reloading and moving them is shared here."""

    def __init__(self, **params):
        super().__init__(**params)
        self.nets: nn.ModuleDict | None = None
        self.input_shape: tuple[int, ...] | None = None

    def build_nets(self, input_shape: tuple[int, ...]) -> nn.ModuleDict:
        raise NotImplementedError

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger on float images, with the nets already on x's device; differentiable."""
        raise NotImplementedError

    def trigger_float(self, x: torch.Tensor) -> torch.Tensor:
        self.fitted_nets(x.device)
        return in_batches(self.generate, x)

    def new_nets(self, input_shape: Sequence[int], seed: int, device: torch.device) -> nn.ModuleDict:
        """Freshly initialised nets (seeded) for images of `input_shape`, kept as this attack's trigger."""
        self.input_shape = tuple(int(v) for v in input_shape)
        with seeded(seed):
            self.nets = self.build_nets(self.input_shape).to(device)
        return self.nets

    def fitted_nets(self, device: torch.device | None = None) -> nn.ModuleDict:
        """The learned nets, moved to `device` when given."""
        if self.nets is None:
            raise RuntimeError(f"attack {self.name!r}: the trigger is learned; call fit() first (the poison "
                               f"stage does) or load_state_arrays() with the arrays a poison file saved")
        return self.nets if device is None else self.nets.to(device)

    def state_arrays(self) -> dict[str, np.ndarray]:
        nets = self.fitted_nets(torch.device("cpu"))
        return {INPUT_SHAPE: np.asarray(self.input_shape, dtype=np.int64),
                **{key: value.detach().cpu().numpy() for key, value in nets.state_dict().items()}}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> "LearnedImageAttack":
        """Rebuild the learned trigger from `state_arrays()` output (the poison file's `trigger.*`)."""
        self.input_shape = tuple(int(v) for v in arrays[INPUT_SHAPE])
        nets = self.build_nets(self.input_shape)
        nets.load_state_dict({key: torch.from_numpy(np.asarray(value)) for key, value in arrays.items()
                              if key != INPUT_SHAPE})
        self.nets = nets.requires_grad_(False).eval()
        return self
