"""The report's trigger pictures, the poison stage's record of which test sample each triggered one
came from, and the train stage's snapshots for the detectors."""

from __future__ import annotations

import numpy as np
import torch

from pipeline_pkg import stages
from pipeline_pkg.h5io import read_h5, write_h5
from pipeline_pkg.render import moved_points, render_trigger, trigger_example

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_poison_file_pairs_each_triggered_test_sample_with_its_clean_original(backdoored_rf, tmp_path):
    config, _, model_path = backdoored_rf
    poison_file = model_path.with_name("poison.h5")
    arrays, attrs = read_h5(poison_file)
    idx = arrays["test_bd_idx"]
    assert len(idx) == len(arrays["x_test_bd"]) and (arrays["y_test"][idx] != 0).all()
    burst = stages.attack_obj(config, "burst", "rf")
    assert np.allclose(burst.trigger_numpy(arrays["x_test"][idx]), arrays["x_test_bd"], atol=1e-6)
    clean, triggered, _ = trigger_example(poison_file, index=3)
    assert np.array_equal(clean, arrays["x_test"][idx[3]]) and np.array_equal(triggered, arrays["x_test_bd"][3])
    out = render_trigger(poison_file, tmp_path / "figures" / "burst.png")
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_train_keeps_evenly_spaced_snapshots_for_the_detector_ensemble(backdoored_rf):
    config, _, model_path = backdoored_rf
    assert stages.snapshot_epochs(6, 3) == [1, 3] and stages.snapshot_epochs(12, 1) == []
    assert stages.snapshot_epochs(2, 5) == [0]  # never the final epoch, never twice the same
    models = stages.load_ensemble(config, model_path, model_path.with_name("snapshots.pt"), torch.device("cpu"))
    assert len(models) == config["detection"]["ensemble"] == 2  # tiny.yaml: a snapshot and the final model
    assert torch.load(model_path.with_name("snapshots.pt"), weights_only=True)["epochs"] == stages.snapshot_epochs(6, 2) == [2]
    final, _ = stages.load_model(config, model_path, torch.device("cpu"))
    weights = [torch.cat([p.flatten() for p in m.parameters()]) for m in models]
    assert torch.equal(weights[-1], torch.cat([p.flatten() for p in final.parameters()]))
    assert not torch.equal(weights[0], weights[1])
    assert not model_path.with_name("snapshots.partial.pt").exists()


def test_image_and_point_cloud_triggers_are_drawn(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    stamped = images[1:].copy()
    stamped[:, :, -3:, -3:] = 255
    write_h5(tmp_path / "image.h5", {"x_test": images, "x_test_bd": stamped, "test_bd_idx": np.arange(1, 4)},
             {"dataset": "toy", "modality": "image", "attack": "badnets"})
    assert render_trigger(tmp_path / "image.h5", tmp_path / "image.png").read_bytes().startswith(PNG_SIGNATURE)

    clouds = rng.normal(size=(2, 64, 3)).astype(np.float32)
    triggered = clouds.copy()
    triggered[:, :5] = [0.9, 0.9, 0.9] + 0.01 * rng.normal(size=(2, 5, 3))
    assert moved_points(clouds[0], triggered[0]).tolist() == [True] * 5 + [False] * 59
    write_h5(tmp_path / "cloud.h5", {"x_test": clouds, "x_test_bd": triggered, "test_bd_idx": np.arange(2)},
             {"dataset": "toy", "modality": "pointcloud", "attack": "pointba_i"})
    assert render_trigger(tmp_path / "cloud.h5", tmp_path / "cloud.png").read_bytes().startswith(PNG_SIGNATURE)
