"""evaluate.py: the Frechet distance against closed forms, the real-data halves, and a whole evaluation of a tiny run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluate import balanced_halves, frechet_distance

REPO = Path(__file__).resolve().parent.parent


def test_frechet_distance_closed_forms():
    torch.manual_seed(0)
    a = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    # b = 2a + 3: Sigma_b = 4 Sigma_a commutes with Sigma_a, so (Sigma_a Sigma_b)^(1/2) = 2 Sigma_a and
    # FD = |mu_a - mu_b|^2 + tr(Sigma_a + 4 Sigma_a - 4 Sigma_a) = |mu_a + 3|^2 + tr(Sigma_a), exactly
    b = 2 * a + 3
    expected = (a.mean(0) + 3).square().sum() + torch.cov(a.T).trace()
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected.item(), rel=1e-6)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    x, y = torch.randn(400, 1, dtype=torch.float64), 0.5 * torch.randn(300, 1, dtype=torch.float64) + 1
    expected = (x.mean() - y.mean()) ** 2 + (x.std() - y.std()) ** 2
    assert frechet_distance(x, y) == pytest.approx(expected.item(), rel=1e-6)


def test_balanced_halves_are_disjoint_and_balanced():
    labels = torch.arange(100) % 4
    a, b = balanced_halves(labels, per_class=10)
    assert len(set(a.tolist()) & set(b.tolist())) == 0
    assert torch.bincount(labels[a]).tolist() == [10] * 4 and torch.bincount(labels[b]).tolist() == [10] * 4
    a, b = balanced_halves(labels, per_class=100)  # a class with too few images gives what it has, split in two
    assert len(a) == len(b) == 48


def test_evaluate_a_tiny_conditional_run(tmp_path):
    """Train a few steps, then evaluate: the figures are there and in range; no Inception weights here, so the FID is
    skipped with a one-line reason; the classifier is cached beside the data for the next call."""
    tiny = ["--num_images", "64", "--img_size", "16", "--width", "8", "--batch_size", "16", "--sample_steps", "2",
            "--epochs", "1", "--amp", "False"]
    subprocess.run([sys.executable, str(REPO / "ddpm_conditional.py"), *tiny], cwd=tmp_path, check=True,
                   capture_output=True, timeout=300)
    env_home = {"TORCH_HOME": str(tmp_path / "torch_home")}  # an empty cache: no Inception weights
    command = [sys.executable, str(REPO / "evaluate.py"), "--ckpt", "models/DDPM_conditional/ema_ckpt.pt",
               "--n_per_class", "4", "--steps", "3", "--json", "out.json"]
    import os
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env_home})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FID: skipped, no Inception-v3 weights on this machine" in result.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["n_samples"] == 24 and 0 <= report["main"]["accuracy"] <= 1
    assert report["main"]["fd"] > 0 and report["main"]["fd_floor"] > 0 and report["fid"] is None
    assert report["classifier_accuracy_real"] > 0.9  # the built-in shapes are easy to tell apart
    assert list((tmp_path / "data").glob("shapes_classifier_16x16_c3.pt"))
