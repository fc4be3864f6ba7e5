"""evaluate.py: the Frechet distance against closed forms, the real reference sets, Inception features with a stand-in
network, and whole evaluations of tiny runs (built-in data, an image folder)."""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
from conftest import PATIENCE
from ddpm import Diffusion
from evaluate import frechet_distance, inception_features, inception_network, reference_counts, reference_halves
from test_diffusion import MU, STD, GaussianEps, deterministic_gain
from test_train import run as train  # a script's training run, in this process

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


def test_reference_halves_are_disjoint_and_follow_the_class_counts():
    labels = torch.arange(100) % 4
    a, b = reference_halves(labels, torch.full((4,), 10))
    assert len(set(a.tolist()) & set(b.tolist())) == 0
    assert torch.bincount(labels[a]).tolist() == [10] * 4 and torch.bincount(labels[b]).tolist() == [10] * 4
    a, b = reference_halves(labels, torch.full((4,), 100))  # a class with too few gives what it has, split in two
    assert len(a) == len(b) == 48
    rare = torch.cat([torch.zeros(60), torch.ones(6)]).long()  # like FER-2013's "disgust"
    a, b = reference_halves(rare, torch.tensor([20, 20]))
    assert torch.bincount(rare[a]).tolist() == torch.bincount(rare[b]).tolist() == [20, 3]


def test_reference_counts_balanced_when_conditional_else_in_the_training_mix():
    train_labels = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    assert reference_counts(train_labels, 3, 50, conditional=True).tolist() == [50, 50, 50]
    assert reference_counts(train_labels, 3, 50, conditional=False).tolist() == [105, 30, 15]


class StandInInception(torch.nn.Module):
    """The interface of torchmetrics' NoTrainInceptionV3 and of evaluate.ImageNetInput: uint8 images (N, 3, H, W)
    -> (N, 2048) features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.projection = torch.nn.Linear(3, 2048)

    def forward(self, images):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        return self.projection(images.float().mean(dim=(2, 3)) / 255)


def test_inception_features_keep_every_image_and_give_rgb_to_the_network():
    net = StandInInception()
    torch.manual_seed(1)
    gray_a = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8)
    gray_b = torch.randint(0, 200, (25, 1, 8, 8), dtype=torch.uint8)
    features_a = inception_features(net, gray_a, batch_size=7)
    features_b = inception_features(net, gray_b, batch_size=7)
    assert features_a.shape == (30, 2048) and features_a.dtype == torch.float64
    with torch.no_grad():
        direct_a, direct_b = (net(x.expand(-1, 3, -1, -1)).double() for x in (gray_a, gray_b))
    assert torch.allclose(features_a, direct_a, rtol=1e-6, atol=1e-6)  # float32 rounding of other batch sizes
    assert frechet_distance(features_a, features_b) == pytest.approx(frechet_distance(direct_a, direct_b), rel=1e-5)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_inception_weights_are_only_used_when_already_here(tmp_path, monkeypatch, no_network):
    """torchmetrics' network downloads its weights when it is built without them: it is built only when its weights
    file is already in torch's cache; else FID is skipped with the reason, and nothing is fetched."""
    built = []

    class NoTrainInceptionV3(StandInInception):  # stands in for torchmetrics' class: records that it was built
        def __init__(self, name, features_list):
            super().__init__()
            built.append((name, features_list))

    fid_module = types.ModuleType("torchmetrics.image.fid")
    fid_module.NoTrainInceptionV3 = NoTrainInceptionV3
    for name in ("torchmetrics", "torchmetrics.image"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "torchmetrics.image.fid", fid_module)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net, why = inception_network("cpu")
    assert net is None and why.startswith("no Inception-v3 weights on this machine") and built == []
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / evaluate.TF_FID_WEIGHTS).touch()
    net, why = inception_network("cpu")
    assert isinstance(net, NoTrainInceptionV3) and why.startswith("standard")
    assert built == [("inception-v3-compat", ["2048"])]


def test_torchvision_inception_gets_the_input_transform_of_its_weights(tmp_path, monkeypatch, no_network):
    """torchvision's builder sets transform_input=True for its ImageNet Inception weights (trained on inputs in
    [-1, 1]): loaded by hand, the network must set it too, and it gives 2048 features per image."""
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # not installed
    weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(),
               checkpoints / Path(weights.url).name)
    net, why = inception_network("cpu")
    assert why.startswith("torchvision's") and net.net.transform_input is True
    features = inception_features(net, torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()


def test_sweep_names_and_plots_each_sampler(tmp_path):
    """The sweep's rows: DDIM and DPM++ steps, and all T steps named ancestral whatever the sampler; the plot draws
    them; an unknown --sampler stops evaluate.py with one line before anything is loaded."""
    config = types.SimpleNamespace(noise_steps=1000)
    assert evaluate.sampler_name(20, "dpm++", config) == "DPM++ 20 steps"
    assert evaluate.sampler_name(50, "ddim", config) == "DDIM 50 steps"
    assert evaluate.sampler_name(1000, "dpm++", config) == "ancestral 1000 steps"
    rows = [{"sweep": sweep, "cfg_scale": scale, "steps": steps, "sampler": sampler, "fd": 10.0, "accuracy": 0.5}
            for sweep, scale, steps, sampler in (("cfg_scale", 1, 50, "ddim"), ("cfg_scale", 3, 50, "ddim"),
                                                 ("steps", 3, 10, "ddim"), ("steps", 3, 1000, "ddim"),
                                                 ("steps", 3, 10, "dpm++"), ("steps", 3, 20, "dpm++"))]
    evaluate.sweep_plot(rows, tmp_path / "sweep.png")
    assert Image.open(tmp_path / "sweep.png").size == (1000, 400)
    with pytest.raises(SystemExit, match="^error: sampler 'plms': expected 'ddim' or 'dpm\\+\\+'$"):
        evaluate.main(["--ckpt", str(tmp_path / "none.pt"), "--sampler", "plms"])
    with pytest.raises(SystemExit, match="^error: --ode_error -1: expected a number of samples \\(0: off\\)$"):
        evaluate.main(["--ckpt", str(tmp_path / "none.pt"), "--ode_error", "-1"])


def test_ode_error_is_each_samplers_distance_to_the_odes_solution():
    """ode_errors on Gaussian data, with the exact predictor: every deterministic sampler maps x_T to
    mu + K (x_T - sqrt(alpha_hat_T) mu), with its own K = K_exact (1 + deterministic_gain), so its RMS distance to
    the reference's output from the same noise is K_exact |gain - gain_reference| RMS(x_T - sqrt(alpha_hat_T) mu),
    in closed form. DDIM's distance halves as its steps double; DPM-Solver++'s is far smaller at each."""
    diffusion = Diffusion(img_size=8, channels=2, device="cpu", prediction="v")
    reference_steps, rows = evaluate.ode_errors(diffusion, GaussianEps(diffusion, MU, STD), None, 16, cfg_scale=1,
                                                amp_dtype=None, seed=3, reference_steps=200)
    assert reference_steps == 200
    assert [(r["sampler"], r["steps"]) for r in rows] == [("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100),
                                                         ("dpm++", 10), ("dpm++", 20), ("dpm++", 50)]
    a_T = diffusion.alpha_hat_list[-1]
    x_T = torch.randn((16, 2, 8, 8), generator=torch.Generator().manual_seed(3))
    spread = (x_T - math.sqrt(a_T) * MU).square().mean().sqrt().item()
    K_exact = STD / math.sqrt(a_T * STD ** 2 + 1 - a_T)
    reference = deterministic_gain(diffusion, 200, "dpm++")
    for r in rows:
        expected = K_exact * abs(deterministic_gain(diffusion, r["steps"], r["sampler"]) - reference) * spread
        assert r["rms"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    rms = {(r["sampler"], r["steps"]): r["rms"] for r in rows}
    assert rms["ddim", 10] > rms["ddim", 20] > rms["ddim", 50] > rms["ddim", 100]
    assert all(rms["dpm++", s] < rms["ddim", s] / 5 for s in (10, 20, 50))
    short = Diffusion(noise_steps=30, img_size=8, channels=2, device="cpu", prediction="v")
    reference_steps, rows = evaluate.ode_errors(short, GaussianEps(short, MU, STD), None, 2, 1, None)
    assert reference_steps == 29 and [r["steps"] for r in rows] == [10, 20, 10, 20]  # T steps would be ancestral


def run_evaluate(tmp_path, *args):
    """`python evaluate.py <args>` in tmp_path with an empty torch cache (no Inception weights); its output."""
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args, "--device", "cpu"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=PATIENCE,
                            env={**os.environ, "TORCH_HOME": str(tmp_path / "torch_home")})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_evaluate_a_tiny_conditional_run_then_an_unconditional_one(tmp_path, monkeypatch, capsys, auto_is_not_the_cpu):
    """Train a few steps, then evaluate: the figures are there and in range; no Inception weights here, so the FID is
    skipped with a one-line reason; the classifier cached beside the data is used (tests/reference's, put there:
    training it would take a minute; the folder test below trains and caches one). Then an unconditional
    run (ddpm.py): FD only, and no guidance scale named, since it has none; its sweep's cfg_scale row is the main
    setting's samples, not drawn again (guidance does not change them: evaluate.py runs here, its sampler watched)."""
    tiny = ["--num_images", "64", "--img_size", "16", "--width", "8", "--batch_size", "16", "--sample_steps", "2",
            "--epochs", "1", "--amp", "False"]
    train("ddpm_conditional.py", *tiny, cwd=tmp_path)
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "tests" / "reference" / "shapes_classifier_16x16_c3.pt", tmp_path / "data")
    result = run_evaluate(tmp_path, "--ckpt", "models/DDPM_conditional/ema_ckpt.pt", "--n_per_class",
                          "4", "--steps", "3", "--sampler", "dpm++", "--ode_error", "6", "--json", "out.json")
    assert "training a classifier" not in result.stdout
    assert "24 samples, cfg_scale 3, DPM++ 3 steps: FD" in result.stdout
    assert "FID: skipped, no Inception-v3 weights on this machine" in result.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["n_samples"] == 24 and 0 <= report["main"]["accuracy"] <= 1
    assert report["main"]["fd"] > 0 and report["main"]["fd_floor"] > 0 and report["fid"] is None
    assert report["classifier_accuracy_real"] > 0.9  # the built-in shapes are easy to tell apart
    assert list((tmp_path / "data").glob("shapes_classifier_16x16_c3.pt"))
    assert "distance to the ODE's solution (DPM++ 250 steps), RMS in [-1, 1] units, 6 samples" in result.stdout
    assert report["ode_error"]["reference"] == "DPM++ 250 steps"
    assert [(r["sampler"], r["steps"], r["n_samples"]) for r in report["ode_error"]["rows"]][::3] == [
        ("ddim", 10, 6), ("ddim", 100, 6), ("dpm++", 50, 6)]

    train("ddpm.py", *tiny, cwd=tmp_path)
    drawn, generate = [], evaluate.generate  # the settings sampled, in order

    def watched_generate(diffusion, model, labels, n, cfg_scale, steps, *args, **kwargs):
        drawn.append((cfg_scale, steps, kwargs["sampler"]))
        return generate(diffusion, model, labels, n, cfg_scale, steps, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", watched_generate)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    evaluate.main(["--ckpt", "models/DDPM_unconditional/ema_ckpt.pt", "--device", "cpu", "--n_per_class", "4",
                   "--steps", "3", "--sweep", "--json", "out.json"])
    stdout = capsys.readouterr().out
    assert "training a classifier" not in stdout  # the one the first call cached
    line = next(line for line in stdout.splitlines() if line.startswith("24 samples"))
    assert line.startswith("24 samples, DDIM 3 steps: FD ") and "cfg_scale" not in line and "accuracy" not in line
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["main"]["fd"] > 0 and "accuracy" not in report["main"]
    assert [(r["sweep"], r["cfg_scale"], r["steps"]) for r in report["sweep"][:2]] == [("cfg_scale", 1, 3),
                                                                                       ("steps", 3, 10)]
    assert report["sweep"][0]["fd"] == report["main"]["fd"]
    assert drawn[:2] == [(3, 3, "ddim"), (3, 10, "ddim")]  # the cfg_scale row took the main setting's samples
    assert len(drawn) == len(report["sweep"])  # the main setting and each row but that one


def test_ctrl_c_stops_evaluate_with_one_line(monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "evaluate", interrupted)
    with pytest.raises(SystemExit, match=r"^stopped \(Ctrl-C\)$"):
        evaluate.main(["--ckpt", "models/run/ema_ckpt.pt"])


def test_evaluate_a_run_on_an_image_folder_with_a_rare_class(tmp_path):
    """A folder has no test split: a fifth of each class is held out from the classifier as the real set, and said
    so; the samples follow the real set's class counts, a rare class included."""
    from data import draw_shapes
    shapes = draw_shapes(240, (16, 16))  # 40 of each shape
    for name, label, count in (("circles", 0, 40), ("squares", 1, 10)):
        folder = tmp_path / "faces" / name
        folder.mkdir(parents=True)
        for i, image in enumerate(shapes.images[shapes.labels == label][:count]):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    tiny = ["--dataset", "faces", "--img_size", "16", "--width", "8", "--batch_size", "16", "--sample_steps", "2",
            "--epochs", "1", "--amp", "False"]
    train("ddpm_conditional.py", *tiny, cwd=tmp_path)
    result = run_evaluate(tmp_path, "--ckpt", "models/DDPM_conditional/ema_ckpt.pt", "--n_per_class",
                          "4", "--steps", "2", "--json", "out.json")
    assert "training a classifier on 40 real images" in result.stdout  # 32 circles + 8 squares; 8 + 2 held out
    assert "once: it is cached as faces.classifier_16x16_c3.pt" in result.stdout
    assert (tmp_path / "faces.classifier_16x16_c3.pt").exists()  # beside the folder, for the next call
    assert re.search(r"classifier: +\d+%", result.stderr)  # its progress bar
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["real_reference"].startswith("5 training images held out from the classifier (20% of each class")
    assert report["n_samples"] == 5 and report["class_counts"] == [4, 1]


# --- multi-hot labels (attributes) ---

def test_multi_label_measure_gives_each_attributes_accuracy_and_their_mean():
    """A classifier that always sees attribute 0 and never attribute 1: its agreement with what each sample asked
    for is counted per attribute, present or absent; FD is taken on its features as for single labels."""
    torch.manual_seed(0)
    classifier = evaluate.Classifier(3, 2).eval()
    with torch.no_grad():
        classifier.head.weight.zero_()
        classifier.head.bias.copy_(torch.tensor([2.0, -2.0]))
    samples = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    asked = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    real = torch.randn(10, 256, dtype=torch.float64)
    result = evaluate.measure(samples, asked, classifier, real, 0.5, True, ["Smiling", "Hat"])
    assert result["attribute_accuracy"] == {"Smiling": 0.75, "Hat": 0.5} and result["accuracy"] == 0.625
    with torch.no_grad():
        features = classifier.features(samples).double()
    assert result["fd"] == pytest.approx(frechet_distance(features, real)) and result["fd_floor"] == 0.5
    single = evaluate.measure(samples, torch.tensor([0, 0, 1, 0]), classifier, real, 0.5, True)  # argmax: class 0
    assert single["accuracy"] == 0.75 and "attribute_accuracy" not in single


def test_a_multi_label_classifier_learns_attributes_that_occur_together(tmp_path):
    """Binary cross-entropy, one sigmoid per attribute: images with a red and/or a green square (each present or
    not) are told apart attribute by attribute, both-present included; cached under a multi-label name."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64, 2), generator=g).float()
    images = torch.randint(0, 60, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    images[:, 0, :4, :4] += (labels[:, 0, None, None] * 190).byte()  # red top left: attribute 0
    images[:, 1, 4:, 4:] += (labels[:, 1, None, None] * 190).byte()  # green bottom right: attribute 1
    path = evaluate.classifier_path("multishapes", tmp_path, (8, 8), 3, multi_label=True, attributes="star,circle")
    assert path.name == "multishapes_classifier_8x8_c3_multilabel_star-circle.pt"
    assert path != evaluate.classifier_path("shapes", tmp_path, (8, 8), 3)
    from data import ImageTensors
    classifier = evaluate.get_classifier(ImageTensors(images, labels, ["red", "green"]), path, "cpu", flip=False,
                                         max_steps=40)
    predictions, _ = evaluate.classify(classifier, images, multi_label=True)
    assert predictions.dtype == torch.bool and evaluate.agreement(predictions, labels).min() > 0.9
    both = (labels == 1).all(1)
    assert both.any() and predictions[both].float().mean() > 0.9 and path.exists()


def test_a_checkpoint_and_data_of_different_label_kinds_are_refused(tmp_path, auto_is_not_the_cpu):
    """A single-label run evaluated against an attribute table (multi-hot labels) stops with one line."""
    import ddpm_conditional
    from ddpm import make_model
    from options import parse_config
    (tmp_path / "faces.csv").write_text("file,Smiling,Hat\n" + "".join(f"{i}.png,1,0\n" for i in range(10)))
    for i in range(10):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
    config = vars(parse_config(vars(ddpm_conditional), ["--img_size", "16", "--width", "8"]))
    config.update(dataset=str(tmp_path / "faces.csv"), channels=3, num_classes=2, classes=["a", "b"],
                  multi_label=False)
    models = tmp_path / "models" / "run"
    models.mkdir(parents=True)
    (models / "config.json").write_text(json.dumps(config))
    torch.save(make_model(types.SimpleNamespace(**config)).state_dict(), models / "ema_ckpt.pt")
    with pytest.raises(SystemExit, match=r"^error: '.*ema_ckpt\.pt' was trained on one class an image, but "
                                         r"'.*faces\.csv' has multi-hot labels \(attributes\): pass a --dataset"):
        evaluate.main(["--ckpt", str(models / "ema_ckpt.pt"), "--device", "cpu"])
