import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_environment():
    # mlflow.set_tracking_uri and the pipeline's start_invocation write os.environ; a value left behind
    # would send a later test's Snakemake jobs to another tracking store.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # Tests run on 2 cores next to Snakemake subprocesses: one torch thread each keeps timings sane.
    torch.set_num_threads(1)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 serving the files a download test puts on it (tests/http_server.py)."""
    from http_server import running_server

    with running_server() as httpd:
        yield httpd


def pytest_configure(config):
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


@pytest.fixture(scope="session")
def backdoored_rf(tmp_path_factory):
    """A small RF1024 model with a burst backdoor, trained once per test session through the pipeline's
    own stages (tiny data: 150 frames per class, 256 samples, 6 epochs): (config, data, model path)."""
    from pipeline_pkg import stages
    from pipeline_pkg.config import load

    out = tmp_path_factory.mktemp("backdoored_rf")
    config = load(REPO / "config" / "tiny.yaml")
    config.update(results_dir=str(out), tracking={**config["tracking"], "enabled": False})
    torch.set_num_threads(1)
    stages.build_dataset(config, "rf1024", out / "rf1024.h5")
    stages.poison(config, "rf1024", "burst", 0, out / "rf1024.h5", out / "poison.h5")
    stages.train(config, "rf1024", "burst", "rf_cnn", 0, out / "poison.h5", out / "model.pt")
    data, _ = stages.load_poisoned(out / "poison.h5", torch.device("cpu"))
    return config, data, out / "model.pt"
