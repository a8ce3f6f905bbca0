"""RF1024 generator: layout, power and SNR calibration, reproducibility, class separability, config checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.datasets.rf1024 import CLASSES, RF1024, generate_rf1024
from pipeline_pkg.registry import DATASETS

N_PER_CLASS = 50
SPS = 8


@pytest.fixture(scope="module")
def default_set():
    return generate_rf1024(N_PER_CLASS, seed=0, device="cpu", return_components=True)


@pytest.fixture(scope="module")
def clean_set():
    """High SNR, no frequency offset, flat channel: the modulation itself dominates the frame."""
    return generate_rf1024(N_PER_CLASS, seed=1, snr_db=(30.0, 30.0), max_cfo=0.0, multipath_taps=1,
                           device="cpu")


def _complex(x: np.ndarray) -> np.ndarray:
    return x[:, 0].astype(np.float64) + 1j * x[:, 1].astype(np.float64)


def _measured_snr_db(signal: np.ndarray, noise: np.ndarray) -> np.ndarray:
    # Es/N0 as the module defines it: sps * mean|s|^2 / mean|n|^2 over the frame.
    return 10 * np.log10(SPS * np.mean(np.abs(signal) ** 2, axis=1) / np.mean(np.abs(noise) ** 2, axis=1))


def test_shapes_and_dtypes(default_set):
    x, y, snr, signal, noise = default_set
    n = N_PER_CLASS * len(CLASSES)
    assert x.shape == (n, 2, 1024) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int64
    assert snr.shape == (n,) and snr.dtype == np.float32
    assert signal.shape == noise.shape == (n, 1024)
    assert np.iscomplexobj(signal) and np.iscomplexobj(noise)
    assert np.all(np.isfinite(x))
    assert CLASSES == ["BPSK", "QPSK", "8PSK", "16QAM", "64QAM", "PAM4", "GFSK", "CPFSK"]


def test_custom_length_and_sps():
    x, y, snr = generate_rf1024(3, seed=0, length=300, samples_per_symbol=4, device="cpu")
    assert x.shape == (3 * len(CLASSES), 2, 300)


def test_class_balance_and_shuffled(default_set):
    _, y, *_ = default_set
    assert np.array_equal(np.bincount(y, minlength=len(CLASSES)), [N_PER_CLASS] * len(CLASSES))
    # Shuffled: any slice (e.g. a validation split) holds several classes.
    assert len(np.unique(y[-len(y) // 10:])) > 4


def test_unit_average_power(default_set):
    x, *_ = default_set
    power = np.sum(x.astype(np.float64) ** 2, axis=1).mean(axis=1)
    assert abs(power.mean() - 1.0) < 1e-3
    assert np.max(np.abs(power - 1.0)) < 1e-3


def test_components_add_up_to_frame(default_set):
    x, _, _, signal, noise = default_set
    assert np.allclose(_complex(x), signal + noise, atol=1e-5)


def test_realised_snr_matches_drawn_snr(default_set):
    _, _, snr, signal, noise = default_set
    assert np.all((snr >= 0.0) & (snr <= 20.0))
    assert snr.max() - snr.min() > 15  # the range is actually used
    assert np.max(np.abs(_measured_snr_db(signal, noise) - snr)) < 0.5


def test_fixed_snr_range():
    _, _, snr, signal, noise = generate_rf1024(10, seed=4, snr_db=(10.0, 10.0), device="cpu",
                                               return_components=True)
    assert np.allclose(snr, 10.0)
    assert np.max(np.abs(_measured_snr_db(signal, noise) - 10.0)) < 0.5


def test_same_seed_identical_different_seed_different():
    a = generate_rf1024(10, seed=7, device="cpu")
    b = generate_rf1024(10, seed=7, device="cpu")
    c = generate_rf1024(10, seed=8, device="cpu")
    for first, second in zip(a, b):
        assert first.tobytes() == second.tobytes()
    assert a[0].tobytes() != c[0].tobytes()
    assert a[2].tobytes() != c[2].tobytes()


def test_constant_envelope_only_for_fsk(clean_set):
    x, y, _ = clean_set
    z = _complex(x)
    envelope_variance = np.var(np.abs(z) ** 2, axis=1)
    fsk = np.isin(y, [CLASSES.index("GFSK"), CLASSES.index("CPFSK")])
    assert envelope_variance[fsk].max() < 0.05
    assert envelope_variance[~fsk].min() > 0.1


def test_real_valued_constellations_are_noncircular(clean_set):
    # BPSK and PAM4 are real before the channel phase, so |E[z^2]| / E|z|^2 is ~1; for the complex
    # constellations and FSK it averages out towards 0.
    x, y, _ = clean_set
    z = _complex(x)
    noncircularity = np.abs(np.mean(z ** 2, axis=1)) / np.mean(np.abs(z) ** 2, axis=1)
    real_valued = np.isin(y, [CLASSES.index("BPSK"), CLASSES.index("PAM4")])
    assert noncircularity[real_valued].min() > 0.9
    assert noncircularity[~real_valued].mean() < 0.2
    assert noncircularity[~real_valued].max() < 0.5


def test_qam_has_more_amplitude_spread_than_psk(clean_set):
    x, y, _ = clean_set
    z = _complex(x)
    fourth_moment = np.mean(np.abs(z) ** 4, axis=1)  # power is 1, so this is the normalised moment

    def class_mean(name: str) -> float:
        return float(fourth_moment[y == CLASSES.index(name)].mean())

    for qam in ("16QAM", "64QAM"):
        for psk in ("QPSK", "8PSK"):
            assert class_mean(qam) > class_mean(psk) + 0.15
    assert class_mean("PAM4") > class_mean("BPSK") + 0.3


def test_gaussian_filter_narrows_fsk_spectrum():
    # GFSK's smoothed frequency pulse puts less power beyond one symbol rate than CPFSK's rectangle;
    # the SNR is high enough that the noise floor does not hide the sidelobes.
    x, y, _ = generate_rf1024(20, seed=2, snr_db=(80.0, 80.0), max_cfo=0.0, multipath_taps=1,
                              device="cpu")
    spectrum = np.abs(np.fft.fft(_complex(x), axis=1)) ** 2
    frequency = np.abs(np.fft.fftfreq(x.shape[-1]))
    out_of_band = spectrum[:, frequency > 1 / SPS].sum(axis=1) / spectrum.sum(axis=1)
    assert out_of_band[y == CLASSES.index("GFSK")].mean() < 0.5 * out_of_band[y == CLASSES.index("CPFSK")].mean()


def test_dataset_class_build():
    assert DATASETS.get("rf1024") is RF1024
    dataset = RF1024(train_per_class=12, test_per_class=12, length=256)
    assert dataset.modality == "rf" and dataset.generated
    arrays = dataset.build(Path("unused"), seed=5)
    assert arrays.class_names == CLASSES
    assert arrays.x_train.shape == arrays.x_test.shape == (12 * len(CLASSES), 2, 256)
    assert arrays.extras["snr_train"].shape == (12 * len(CLASSES),)
    assert arrays.extras["snr_test"].shape == (12 * len(CLASSES),)
    # Same sizes, so equal bytes would mean train and test share a random stream.
    assert arrays.x_train.tobytes() != arrays.x_test.tobytes()
    assert not np.any(np.all(arrays.x_train[:, None] == arrays.x_test[None], axis=(2, 3)))
    again = RF1024(train_per_class=12, test_per_class=12, length=256).build(Path("unused"), seed=5)
    assert again.x_train.tobytes() == arrays.x_train.tobytes()
    assert again.x_test.tobytes() == arrays.x_test.tobytes()
    # Adjacent seeds must not reuse each other's streams either (seed 5 test vs seed 6 train).
    other = RF1024(train_per_class=12, test_per_class=12, length=256).build(Path("unused"), seed=6)
    assert other.x_train.tobytes() != arrays.x_test.tobytes()


@pytest.mark.parametrize("key, value", [
    ("snr_db", [20, 0]),
    ("snr_db", [5]),
    ("snr_db", "0-20"),
    ("train_per_class", 0),
    ("test_per_class", -1),
    ("train_per_class", 2.5),
    ("length", 0),
    ("samples_per_symbol", 1),
    ("rolloff", 0.0),
    ("rolloff", 1.5),
    ("gfsk_bt", 0),
    ("fsk_index", -0.5),
    ("max_cfo", -0.001),
    ("max_cfo", 0.5),
    ("multipath_taps", 0),
])
def test_bad_parameters_raise_config_error_naming_key(key, value):
    with pytest.raises(ConfigError, match=key):
        RF1024(**{key: value})


def test_unknown_parameter_rejected():
    with pytest.raises(ConfigError, match="snr"):
        RF1024(snr=[0, 20])


def test_defaults_are_valid():
    dataset = RF1024()
    assert dataset.train_per_class == 1000 and dataset.test_per_class == 200
    assert dataset.snr_db == [0, 20]
