"""RF1024: a synthetic radio-modulation dataset generated from a seed, in the manner of RadioML's
GNU Radio generator (random symbols -> pulse shaping / CPM modulator -> channel -> AWGN).

Eight classes, in this order (the label is the index): BPSK, QPSK, 8PSK, 16QAM, 64QAM, PAM4, GFSK,
CPFSK. Each example is `length` (1024) complex baseband samples at `samples_per_symbol` (8)
samples per symbol, stored as float32 (2, length): row 0 is I, row 1 is Q.

Transmitters
  * Linear modulations (BPSK, QPSK, 8PSK, 16QAM, 64QAM, PAM4): uniformly random symbols from a
    constellation of unit average energy (PAM4: real levels +-1, +-3 divided by sqrt(5)), upsampled
    and shaped with a root-raised-cosine filter (rolloff `rolloff`, span 10 symbols).
  * GFSK: binary symbols +-1, rectangular frequency pulse smoothed by a Gaussian filter of
    bandwidth-time product `gfsk_bt`, continuous phase with modulation index `fsk_index`
    (h = 0.5 makes it GMSK).
  * CPFSK: binary symbols +-1, rectangular frequency pulse, continuous phase, index `fsk_index`.
  Extra symbols are generated on both sides and the frame is cut from the middle, so no class
  shows filter start-up transients; the cut starts at a random sample within a symbol (random
  symbol timing).

Channel, per signal
  * `multipath_taps` sample-spaced taps, complex Gaussian with an exponentially decaying power
    profile (tap k has expected power proportional to exp(-k), so the first is strongest on
    average), normalised to unit total energy;
  * carrier frequency offset uniform in [-max_cfo, +max_cfo] cycles/sample. The default 0.002 is
    in line with RadioML 2016 (up to 500 Hz at 200 kHz sampling = 0.0025) and turns the
    constellation about two revolutions over a 1024-sample frame;
  * carrier phase uniform in [0, 2*pi);
  * AWGN at an SNR drawn uniformly from `snr_db` (dB), per signal.

SNR definition: Es/N0 of the received frame. With s the noiseless received signal (after the
channel) and n the complex noise, both at `samples_per_symbol` samples per symbol,
    Es/N0 = samples_per_symbol * mean(|s|^2) / mean(|n|^2),
measured over the frame. The noise of each frame is scaled so that this holds exactly for the
drawn SNR (the label is the realised SNR, not only its expectation).

Finally every frame (signal + noise) is scaled to unit average power, mean(|x|^2) = 1.

Reproducibility: all randomness is drawn from one seeded CPU `torch.Generator` in a fixed order, and
the arithmetic is float64, so the same seed gives byte-identical arrays on a given device (CUDA is
used when available; CPU and GPU results agree to float32 rounding, not necessarily bit for bit).
Samples are shuffled with a permutation drawn from the same generator, so any slice of the arrays
holds a mix of classes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..registry import DATASETS
from .base import Dataset, DatasetArrays

CLASSES: list[str] = ["BPSK", "QPSK", "8PSK", "16QAM", "64QAM", "PAM4", "GFSK", "CPFSK"]

DEFAULT_MAX_CFO = 0.002  # cycles/sample, see the module docstring
_RRC_SPAN_SYMBOLS = 10  # filter length in symbols; long enough that truncation is negligible
_GAUSSIAN_SPAN_SYMBOLS = 4  # as GNU Radio's GFSK modulator: 4 symbols of Gaussian taps
_FLOAT = torch.float64
_COMPLEX = torch.complex128


def _square_qam(points_per_axis: int) -> np.ndarray:
    levels = np.arange(-(points_per_axis - 1), points_per_axis, 2, dtype=np.float64)
    grid = (levels[:, None] + 1j * levels[None, :]).ravel()
    return grid / np.sqrt(np.mean(np.abs(grid) ** 2))


def _psk(order: int, offset: float = 0.0) -> np.ndarray:
    return np.exp(1j * (offset + 2 * np.pi * np.arange(order) / order))


_CONSTELLATIONS: dict[str, np.ndarray] = {
    "BPSK": np.array([-1.0, 1.0], dtype=np.complex128),
    "QPSK": _psk(4, np.pi / 4),
    "8PSK": _psk(8),
    "16QAM": _square_qam(4),
    "64QAM": _square_qam(8),
    "PAM4": np.array([-3.0, -1.0, 1.0, 3.0], dtype=np.complex128) / np.sqrt(5.0),
}


def root_raised_cosine(samples_per_symbol: int, rolloff: float, span_symbols: int) -> np.ndarray:
    """Unit-energy RRC impulse response with span_symbols * sps + 1 taps."""
    half = span_symbols * samples_per_symbol // 2
    t = np.arange(-half, half + 1, dtype=np.float64) / samples_per_symbol  # in symbol periods
    b = rolloff
    taps = np.empty_like(t)
    at_zero = np.isclose(t, 0.0)
    # The closed form is 0/0 at t = 0 and t = +-1/(4b); those points take their limits.
    at_singular = np.isclose(np.abs(4 * b * t), 1.0)
    regular = ~(at_zero | at_singular)
    tr = t[regular]
    taps[regular] = (np.sin(np.pi * tr * (1 - b)) + 4 * b * tr * np.cos(np.pi * tr * (1 + b))) / (
        np.pi * tr * (1 - (4 * b * tr) ** 2))
    taps[at_zero] = 1 - b + 4 * b / np.pi
    taps[at_singular] = (b / np.sqrt(2)) * ((1 + 2 / np.pi) * np.sin(np.pi / (4 * b))
                                            + (1 - 2 / np.pi) * np.cos(np.pi / (4 * b)))
    return taps / np.sqrt(np.sum(taps ** 2))


def gaussian_pulse_filter(samples_per_symbol: int, bt: float, span_symbols: int) -> np.ndarray:
    """Gaussian lowpass of bandwidth-time product bt, unit DC gain (keeps the frequency deviation)."""
    half = span_symbols * samples_per_symbol // 2
    n = np.arange(-half, half + 1, dtype=np.float64)
    sigma = samples_per_symbol * np.sqrt(np.log(2.0)) / (2 * np.pi * bt)  # in samples
    taps = np.exp(-0.5 * (n / sigma) ** 2)
    return taps / taps.sum()


def _fft_convolve(signals: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Full linear convolution of every row of `signals` (batch, L) with one filter (K,)."""
    out_len = signals.shape[-1] + taps.shape[-1] - 1
    n_fft = 1 << (out_len - 1).bit_length()
    if signals.is_complex() or taps.is_complex():
        spectrum = torch.fft.fft(signals, n_fft) * torch.fft.fft(taps, n_fft)
        return torch.fft.ifft(spectrum)[..., :out_len]
    spectrum = torch.fft.rfft(signals, n_fft) * torch.fft.rfft(taps, n_fft)
    return torch.fft.irfft(spectrum, n_fft)[..., :out_len]


def _mean_power(signals: torch.Tensor) -> torch.Tensor:
    """mean |z|^2 per row, without the square root that abs() would compute."""
    # Mean over the interleaved (re, im) values is half of mean |z|^2; a contiguous reduction is
    # much faster than summing a trailing axis of length 2.
    return 2 * torch.view_as_real(signals).flatten(-2).square().mean(-1)


def _upsample(symbols: torch.Tensor, samples_per_symbol: int) -> torch.Tensor:
    """Zero-stuffing: each symbol becomes an impulse followed by sps - 1 zeros."""
    out = torch.zeros(symbols.shape[0], symbols.shape[1] * samples_per_symbol,
                      dtype=symbols.dtype, device=symbols.device)
    out[:, ::samples_per_symbol] = symbols
    return out


def _continuous_phase(bits: torch.Tensor, samples_per_symbol: int, index: float,
                      pulse_filter: torch.Tensor | None) -> torch.Tensor:
    """Binary CPFSK/GFSK baseband: phase advances by +-pi*h per symbol."""
    frequency = bits.to(_FLOAT).repeat_interleave(samples_per_symbol, dim=1)  # rectangular pulse
    if pulse_filter is not None:
        # 'same'-aligned so the smoothed pulse stays centred on its symbol.
        delay = (pulse_filter.shape[0] - 1) // 2
        frequency = _fft_convolve(frequency, pulse_filter)[:, delay:delay + frequency.shape[1]]
    phase = torch.cumsum(frequency * (math.pi * index / samples_per_symbol), dim=1)
    return torch.polar(torch.ones_like(phase), phase)


def _check_arguments(n_per_class: int, length: int, samples_per_symbol: int,
                     snr_db: tuple[float, float], rolloff: float, gfsk_bt: float,
                     fsk_index: float, max_cfo: float, multipath_taps: int) -> None:
    problems = []
    if n_per_class < 1:
        problems.append(f"n_per_class={n_per_class} must be >= 1")
    if length < 1:
        problems.append(f"length={length} must be >= 1")
    if samples_per_symbol < 2:
        problems.append(f"samples_per_symbol={samples_per_symbol} must be >= 2")
    if len(snr_db) != 2 or snr_db[0] > snr_db[1]:
        problems.append(f"snr_db={snr_db} must be (low, high) with low <= high")
    if not 0 < rolloff <= 1:
        problems.append(f"rolloff={rolloff} must be in (0, 1]")
    if gfsk_bt <= 0 or fsk_index <= 0:
        problems.append(f"gfsk_bt={gfsk_bt} and fsk_index={fsk_index} must be > 0")
    if not 0 <= max_cfo < 0.5:
        problems.append(f"max_cfo={max_cfo} must be in [0, 0.5)")
    if multipath_taps < 1:
        problems.append(f"multipath_taps={multipath_taps} must be >= 1")
    if problems:
        raise ValueError("; ".join(problems))


def generate_rf1024(n_per_class: int, *, seed: int, length: int = 1024, samples_per_symbol: int = 8,
                    snr_db: tuple[float, float] = (0.0, 20.0), rolloff: float = 0.35,
                    gfsk_bt: float = 0.35, fsk_index: float = 0.5, max_cfo: float = DEFAULT_MAX_CFO,
                    multipath_taps: int = 3, device: str | torch.device | None = None,
                    return_components: bool = False) -> tuple[np.ndarray, ...]:
    """Generate n_per_class frames of every class in CLASSES, shuffled (see the module docstring).

    Returns (x, y, snr): x float32 (N, 2, length), y int64 (N,), snr float32 (N,) in dB (Es/N0).
    With return_components=True also (signal, noise): complex128 (N, length), the noiseless received
    signal and the noise, scaled by the same normalisation as x, so x = [Re, Im](signal + noise).
    """
    _check_arguments(n_per_class, length, samples_per_symbol, tuple(snr_db), rolloff, gfsk_bt,
                     fsk_index, max_cfo, multipath_taps)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    rng = torch.Generator(device="cpu").manual_seed(int(seed))
    sps = samples_per_symbol

    rrc = torch.as_tensor(root_raised_cosine(sps, rolloff, _RRC_SPAN_SYMBOLS), device=device).to(_COMPLEX)
    gaussian = torch.as_tensor(gaussian_pulse_filter(sps, gfsk_bt, _GAUSSIAN_SPAN_SYMBOLS), device=device)
    # Margin on each side of the frame: covers the longest filter's transient, the multipath
    # memory and the random timing shift, so the cut frame only sees steady-state signal.
    margin = len(rrc) + multipath_taps + sps
    n_symbols = math.ceil((length + 2 * margin) / sps)
    tap_power = torch.exp(-torch.arange(multipath_taps, dtype=_FLOAT))
    tap_power = tap_power / tap_power.sum()

    def to_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device)

    modulators: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name, points in _CONSTELLATIONS.items():
        constellation = torch.as_tensor(points, device=device)
        modulators[name] = (lambda idx, c=constellation:
                            _fft_convolve(_upsample(c[idx], sps), rrc))
    modulators["GFSK"] = lambda idx: _continuous_phase(2 * idx - 1, sps, fsk_index, gaussian)
    modulators["CPFSK"] = lambda idx: _continuous_phase(2 * idx - 1, sps, fsk_index, None)

    xs, signals, noises, snrs = [], [], [], []
    for name in CLASSES:
        n = n_per_class
        order = len(_CONSTELLATIONS[name]) if name in _CONSTELLATIONS else 2
        # All draws for this class, from the CPU generator in a fixed order.
        symbols = torch.randint(0, order, (n, n_symbols), generator=rng)
        timing = torch.randint(0, sps, (n,), generator=rng)
        phase = 2 * math.pi * torch.rand(n, generator=rng, dtype=_FLOAT)
        cfo = max_cfo * (2 * torch.rand(n, generator=rng, dtype=_FLOAT) - 1)
        taps = torch.complex(*torch.randn(2, n, multipath_taps, generator=rng, dtype=_FLOAT))
        snr = snr_db[0] + (snr_db[1] - snr_db[0]) * torch.rand(n, generator=rng, dtype=_FLOAT)
        noise = torch.complex(*torch.randn(2, n, length, generator=rng, dtype=_FLOAT))
        symbols, timing, phase, cfo, taps, snr, noise = map(
            to_device, (symbols, timing, phase, cfo, taps, snr, noise))

        baseband = modulators[name](symbols)

        taps = taps * torch.sqrt(tap_power.to(device) / 2)
        taps = taps / torch.linalg.vector_norm(taps, dim=1, keepdim=True)
        # Multipath and timing together: output sample i of the frame is
        # sum_k taps[k] * baseband[start + i - k], with a per-signal start.
        start = margin + timing
        positions = start[:, None] + torch.arange(length, device=device)[None, :]
        received = torch.zeros(n, length, dtype=_COMPLEX, device=device)
        for k in range(multipath_taps):
            received += taps[:, k:k + 1] * torch.gather(baseband, 1, positions - k)

        sample_index = torch.arange(length, dtype=_FLOAT, device=device)
        rotation = 2 * math.pi * cfo[:, None] * sample_index[None, :] + phase[:, None]
        received = received * torch.polar(torch.ones_like(rotation), rotation)

        # Scale the noise so the frame's realised Es/N0 equals the drawn SNR exactly.
        signal_power = _mean_power(received)
        noise_power = sps * signal_power / 10 ** (snr / 10)
        noise = noise * torch.sqrt(noise_power / _mean_power(noise))[:, None]

        frame = received + noise
        scale = torch.rsqrt(_mean_power(frame))[:, None]
        xs.append(frame * scale)
        snrs.append(snr)
        if return_components:
            signals.append(received * scale)
            noises.append(noise * scale)

    labels = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
    shuffle = torch.randperm(len(labels), generator=rng)
    frames = torch.cat(xs)[shuffle.to(device)].cpu()
    x = torch.stack([frames.real, frames.imag], dim=1).to(torch.float32).numpy()
    y = labels[shuffle].numpy().astype(np.int64)
    snr_out = torch.cat(snrs)[shuffle.to(device)].cpu().to(torch.float32).numpy()
    if not return_components:
        return x, y, snr_out
    signal_out = torch.cat(signals)[shuffle.to(device)].cpu().numpy()
    noise_out = torch.cat(noises)[shuffle.to(device)].cpu().numpy()
    return x, y, snr_out, signal_out, noise_out


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@DATASETS.register("rf1024")
class RF1024(Dataset):
    """Generated 8-class modulation dataset; see the module docstring for the signal model."""

    modality = "rf"
    generated = True
    defaults = {"train_per_class": 1000, "test_per_class": 200, "length": 1024,
                "samples_per_symbol": 8, "snr_db": [0, 20], "rolloff": 0.35, "gfsk_bt": 0.35,
                "fsk_index": 0.5, "max_cfo": DEFAULT_MAX_CFO, "multipath_taps": 3}

    def check(self) -> None:
        p = self.params
        for key in ("train_per_class", "test_per_class", "length"):
            self.require(_is_int(p[key]) and p[key] >= 1, key, "must be a positive integer")
        self.require(_is_int(p["samples_per_symbol"]) and p["samples_per_symbol"] >= 2,
                     "samples_per_symbol", "must be an integer >= 2")
        snr = p["snr_db"]
        self.require(isinstance(snr, (list, tuple)) and len(snr) == 2
                     and all(_is_number(v) for v in snr) and snr[0] <= snr[1],
                     "snr_db", "must be [low, high] in dB with low <= high")
        self.require(_is_number(p["rolloff"]) and 0 < p["rolloff"] <= 1, "rolloff", "must be in (0, 1]")
        self.require(_is_number(p["gfsk_bt"]) and p["gfsk_bt"] > 0, "gfsk_bt", "must be > 0")
        self.require(_is_number(p["fsk_index"]) and p["fsk_index"] > 0, "fsk_index", "must be > 0")
        self.require(_is_number(p["max_cfo"]) and 0 <= p["max_cfo"] < 0.5, "max_cfo",
                     "must be in [0, 0.5) cycles/sample")
        self.require(_is_int(p["multipath_taps"]) and p["multipath_taps"] >= 1, "multipath_taps",
                     "must be an integer >= 1")

    def build(self, raw_dir: Path, seed: int) -> DatasetArrays:
        p = self.params
        common = dict(length=p["length"], samples_per_symbol=p["samples_per_symbol"],
                      snr_db=(float(p["snr_db"][0]), float(p["snr_db"][1])), rolloff=p["rolloff"],
                      gfsk_bt=p["gfsk_bt"], fsk_index=p["fsk_index"], max_cfo=p["max_cfo"],
                      multipath_taps=p["multipath_taps"])
        # Disjoint seeds (even / odd) so train and test never share a random stream.
        x_train, y_train, snr_train = generate_rf1024(p["train_per_class"], seed=2 * seed, **common)
        x_test, y_test, snr_test = generate_rf1024(p["test_per_class"], seed=2 * seed + 1, **common)
        return DatasetArrays(x_train, y_train, x_test, y_test, list(CLASSES),
                             extras={"snr_train": snr_train, "snr_test": snr_test})
