"""End to end: each script trains a few steps on tiny built-in data, writes its files, resumes to the very same
weights (after a clean stop or a kill at any moment), stops on bad input with one clear line; sample.ipynb's
cells sample from what it wrote (run here in this process; tests/test_notebook.py runs them in a real kernel)."""
import argparse
import contextlib
import copy
import importlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from conftest import PATIENCE
from data import UserError, default_flip
from ddpm import Diffusion, train_step
from importance import ImportanceSampler
from modules import EMA, UNet_conditional
from options import clear_errors, parse_config

REPO = Path(__file__).resolve().parent.parent
TINY = ["--num_images", "48", "--img_size", "16", "--width", "8", "--batch_size", "16", "--sample_steps", "2",
        "--ema_start", "2", "--amp", "False", "--device", "cpu"]  # the CPU even where a GPU is (test_accelerator.py)
RUN = {"ddpm.py": "DDPM_unconditional", "ddpm_conditional.py": "DDPM_conditional"}
SCRIPTS = list(RUN)


def command(script, *args):
    return [sys.executable, str(REPO / script), *TINY, *args]


def run(script, *args, cwd, expect_ok=True):
    """`python <script> <TINY> <args>` in `cwd`, run in this process as the script's `__main__` runs it (an
    interpreter start saved a run): exit status, stdout and stderr as subprocess.run gives them. The kill test, the
    one-line error test and torchrun run real commands."""
    module = importlib.import_module(script.removesuffix(".py"))
    out, err, returncode = io.StringIO(), io.StringIO(), 0
    old_cwd, old_argv = os.getcwd(), sys.argv
    os.chdir(cwd)
    sys.argv = command(script, *args)[1:]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with clear_errors():  # as the script's __main__
                module.train(parse_config(vars(module)))
    except SystemExit as stop:  # sys.exit(text): the text on stderr, exit status 1
        if stop.code not in (None, 0):
            err.write(f"{stop.code}\n")
            returncode = 1
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
    result = subprocess.CompletedProcess(command(script, *args), returncode, out.getvalue(), err.getvalue())
    if expect_ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_state(cwd, script):
    return torch.load(Path(cwd) / "models" / RUN[script] / "train_state.pt", weights_only=True)


def assert_same_training(a, b):
    """Two train_state.pt files hold the same run: weights, EMA, the whole optimizer state, the loss scaler, the
    position (step, epoch, batch), the logged losses and the random stream."""
    for part in ("model", "ema_model"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) == len(a["model"])  # every parameter's moments
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys()
        assert all(torch.equal(state_a[i][k], state_b[i][k]) for k in state_a[i]), f"optimizer state {i}"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scaler"] == b["scaler"]
    assert (a["step"], a["epoch"], a["batch"], a["ema_step"]) == (b["step"], b["epoch"], b["batch"], b["ema_step"])
    assert a["losses"] == b["losses"]
    assert torch.equal(a["generator"], b["generator"])
    assert (a["importance"] is None) == (b["importance"] is None)  # "importance": the losses that draw t
    assert all(torch.equal(a["importance"][k], b["importance"][k]) for k in (a["importance"] or ()))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each script trained for 3 epochs (9 steps) in one go: what every interrupted run must reproduce."""
    runs = {}
    for script in SCRIPTS:
        cwd = tmp_path_factory.mktemp(script.replace(".", "_"))
        run(script, "--epochs", "3", cwd=cwd)
        runs[script] = cwd
    return runs


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_writes_its_files_and_resumes_to_identical_weights(script, tmp_path, uninterrupted):
    first = run(script, "--epochs", "2", cwd=tmp_path)
    assert "48 images, 3 steps per epoch" in first.stdout
    assert re.search(r"epoch 2/2: 100%.*loss=[\d.]+, run_left=00:00\]", first.stderr)  # the whole run's time left
    models, results = tmp_path / "models" / RUN[script], tmp_path / "results" / RUN[script]
    assert {p.name for p in models.iterdir()} == {"ckpt.pt", "ema_ckpt.pt", "train_state.pt", "config.json"}
    assert {p.name for p in results.iterdir()} == {"1.jpg", "2.jpg", "loss.png", "progress.gif"}
    config = json.loads((models / "config.json").read_text())
    assert config["channels"] == 3 and config["num_classes"] == (6 if script == "ddpm_conditional.py" else None)

    # the checkpoints are plain state dicts, loadable the tutorial's way
    from ddpm import make_model
    model = make_model(argparse.Namespace(**config))
    model.load_state_dict(torch.load(models / "ema_ckpt.pt", weights_only=True))
    grid = Image.open(results / "2.jpg")  # a row of 8 per class (6 shapes), or 8 x 8 without classes
    assert grid.size == (2 + 8 * 18, 2 + (6 if config["num_classes"] else 8) * 18)

    second = run(script, "--epochs", "3", cwd=tmp_path)  # the same command, more epochs: it resumes
    assert "resuming" in second.stdout and "at epoch 3, step 6" in second.stdout
    with Image.open(results / "progress.gif") as gif:  # the epoch grids in order, the one of the resumed run too
        assert gif.n_frames == 3 and gif.size == grid.size
        gif.seek(2)
        last = pil_to_tensor(gif.convert("RGB")).float()
        jpg = pil_to_tensor(Image.open(results / "3.jpg").convert("RGB")).float()
        assert (last - jpg).abs().mean() < 8  # the third frame is epoch 3's grid (up to the GIF's 256 colours)
    assert_same_training(final_state(tmp_path, script), final_state(uninterrupted[script], script))
    finished = run(script, "--epochs", "3", cwd=tmp_path).stdout
    assert "nothing to do" in finished and "resuming" not in finished


COSINE = ("--lr_schedule", "cosine", "--lr_warmup", "4")


@pytest.mark.parametrize("script,schedule", [(script, ()) for script in SCRIPTS] + [("ddpm.py", COSINE)] +
                         [("ddpm_conditional.py", ("--optimizer", "muon"))] +
                         [("ddpm.py", ("--timesteps", "importance"))])
def test_killed_at_any_moment_then_resumed_gives_identical_weights(script, schedule, tmp_path):
    """A checkpoint every step; kill -9 soon after the first one appears (mid-epoch, while writing, ...): the files
    left are whole, and running the command again finishes with the uninterrupted run's weights (also along a
    warm-up and cosine learning-rate schedule, with Muon, and with importance-sampled timesteps, whose losses so
    far are saved)."""
    args = ("--epochs", "3", "--save_every", "1", *schedule)
    process = subprocess.Popen(command(script, *args), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    state = tmp_path / "models" / RUN[script] / "train_state.pt"
    deadline = time.time() + PATIENCE
    while not state.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished before the kill
    interrupted = torch.load(state, weights_only=True)  # whole, whenever the kill came
    torch.load(state.with_name("ckpt.pt"), weights_only=True)
    assert 1 <= interrupted["step"] < 9
    run(script, *args, cwd=tmp_path)
    reference = tmp_path / "whole"  # (with SAVE_EVERY 1 the loss is also read at every step, before each save)
    reference.mkdir()
    run(script, *args, cwd=reference)
    if schedule == COSINE:
        last = 2e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 5))  # the 9th step: 4 of the 5 steps after warm-up done
        assert final_state(reference, script)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(last)
    if "importance" in schedule:  # every step's 16 losses, in the bins of their t
        assert final_state(reference, script)["importance"]["loss_count"].sum() == 9 * 16
    assert_same_training(final_state(tmp_path, script), final_state(reference, script))


def test_resuming_with_other_machine_settings_continues_the_same_run(tmp_path, uninterrupted):
    """Settings that change where and how often, not what is computed (the device named, the loss readouts, the
    grid's sampler and its steps) may change on resume: the run ends with the uninterrupted run's weights, bit for
    bit."""
    run("ddpm_conditional.py", "--epochs", "2", cwd=tmp_path)
    second = run("ddpm_conditional.py", "--epochs", "3", "--device", "cpu:0", "--sample_steps", "3", "--sampler",
                 "dpm++", cwd=tmp_path)
    assert "resuming" in second.stdout and "new stream" not in second.stdout
    resumed, reference = final_state(tmp_path, "ddpm_conditional.py"), final_state(uninterrupted["ddpm_conditional.py"],
                                                                                   "ddpm_conditional.py")
    for part in ("model", "ema_model"):
        assert all(torch.equal(resumed[part][k], reference[part][k]) for k in reference[part]), part
    config = json.loads((tmp_path / "models" / "DDPM_conditional" / "config.json").read_text())
    assert config["sample_steps"] == 3 and config["sampler"] == "dpm++"


def test_sampler_and_lr_schedule_options_are_checked_first(tmp_path):
    """--sampler and --lr_schedule are refused with one line before anything starts ("linear", a decay that lost its
    measurement, has left the options)."""
    import ddpm_conditional
    from options import check_config
    config = parse_config(vars(ddpm_conditional), ["--sampler", "plms"])
    with pytest.raises(UserError, match=r"^sampler='plms': expected 'ancestral', 'ddim' or 'dpm\+\+'$"):
        check_config(config)
    config = parse_config(vars(ddpm_conditional), ["--lr_schedule", "linear"])
    with pytest.raises(UserError, match=r"^lr_schedule='linear', lr_warmup=200: expected 'constant' or 'cosine'"):
        check_config(config)


def test_a_run_of_an_earlier_version_is_one_line_saying_how_to_load_its_weights(tmp_path, uninterrupted):
    """A config.json with a setting this version has not (RES_BLOCKS, an option once), or without one it has, and a
    train_state.pt without a part that this version saves: one line, naming the run and how to load its weights."""
    from ddpm import load_run, read_config
    made_here = json.loads((uninterrupted["ddpm.py"] / "models" / RUN["ddpm.py"] / "config.json").read_text())
    assert load_run(uninterrupted["ddpm.py"] / "models" / RUN["ddpm.py"], "cpu")  # this version's run loads
    message = r"was made by an earlier version of this repo: load its weights by hand: model = UNet_conditional"
    for name, config in (("older", {**made_here, "res_blocks": 1}), ("oldest", {"sample_steps": 50})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        for read in (read_config, lambda run: load_run(run, "cpu")):
            with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / name))} {message}.*\.load_state_dict"):
                read(tmp_path / name)
    run("ddpm_conditional.py", "--epochs", "1", cwd=tmp_path)
    path = tmp_path / "models" / "DDPM_conditional" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    del state["window"]  # (what train_state.pt files lacked before the loss window was saved)
    torch.save(state, path)
    result = run("ddpm_conditional.py", "--epochs", "2", cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and re.match(rf"error: models/DDPM_conditional {message}", result.stderr)


def test_a_run_saved_on_another_device_resumes_with_a_new_random_stream(tmp_path):
    """A run trained on a GPU and resumed on the CPU (or the reverse): the GPU's generator state does not fit the
    CPU's generator, so the random draws go on from a stream of (seed, step), said in one line."""
    run("ddpm.py", "--epochs", "1", cwd=tmp_path)
    path = tmp_path / "models" / "DDPM_unconditional" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    state["generator"], state["generator_device"] = torch.zeros(16, dtype=torch.uint8), "cuda"  # a CUDA Philox state
    torch.save(state, path)
    result = run("ddpm.py", "--epochs", "2", cwd=tmp_path)
    message = "resuming on cpu a run saved on cuda: its random draws go on from a new stream (seed 0, step 3)"
    assert message in result.stdout
    resumed = final_state(tmp_path, "ddpm.py")
    assert (resumed["step"], resumed["epoch"], resumed["generator_device"]) == (6, 2, "cpu")
    assert all(torch.isfinite(v).all() for v in resumed["model"].values())


def test_float16_with_a_loss_scaler_resumes_exactly(tmp_path):
    """AMP in float16 (as on a T4, forced here on the CPU with --amp fp16) trains through a GradScaler, whose state is
    saved in train_state.pt: stopped and resumed, the run ends as the uninterrupted one, scaler included."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir()
    parts.mkdir()
    run("ddpm.py", "--epochs", "2", "--amp", "fp16", cwd=whole)
    run("ddpm.py", "--epochs", "1", "--amp", "fp16", cwd=parts)
    out = run("ddpm.py", "--epochs", "2", "--amp", "fp16", cwd=parts).stdout
    assert "with float16 autocast" in out
    reference = final_state(whole, "ddpm.py")
    assert reference["scaler"]["scale"] > 0 and reference["scaler"]["growth_interval"] == 2000
    assert_same_training(final_state(parts, "ddpm.py"), reference)


class ConvModel(torch.nn.Module):
    """A model of (x_t, t) that is not mirror-symmetric: one 3x3 convolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)

    def forward(self, x, t):
        return self.conv(x)


def one_step(images, diffusion, flip=True, amp_dtype=None, scaler=None, model=None):
    model = model or ConvModel()
    config = argparse.Namespace(flip=flip, channels_last=False, cfg_drop=0.1, ema_start=0, grad_accum=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = train_step(model, ConvModel(), EMA(0.9), optimizer, diffusion, images, torch.Generator().manual_seed(0),
                      config, amp_dtype, scaler=scaler)
    return loss, model


@pytest.mark.parametrize("conditional,timesteps", [(False, "uniform"), (True, "importance")])
def test_gradient_accumulation_equals_one_batch_of_all_micro_batches(conditional, timesteps):
    """GRAD_ACCUM = k: k micro-batches of b images give the loss and the gradients of one batch of k * b (the same
    random draws), up to float rounding; with k = 1 the step is the plain one. Importance-sampled timesteps (their
    proposal already away from the logit-normal, so the weights are not 1) learn from all k micro-batches' losses."""
    import ddpm_conditional
    from modules import UNet, UNet_conditional
    step = ddpm_conditional.train_step if conditional else train_step
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = (torch.arange(12) % 3,) if conditional else ()
    results, proposals = [], []
    for k in (1, 3, 12):
        diffusion = Diffusion(img_size=8, channels=1, device="cpu", prediction="v", loss_weighting="min_snr")
        importance = None
        if timesteps == "importance":
            importance = ImportanceSampler(1000, "cpu")
            importance.loss_count.fill_(8)
            importance.loss_square = torch.linspace(0.1, 4, 20)  # larger at more noise
            before = importance.proposal()
        torch.manual_seed(0)
        model = UNet_conditional(1, 1, 32, 3, width=8, attention=(4,)) if conditional else UNet(1, 1, 32, width=8)
        config = argparse.Namespace(flip=True, channels_last=False, cfg_drop=0.5, ema_start=0, grad_accum=k)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: compare the gradients
        loss = step(model, copy.deepcopy(model), EMA(0.9), optimizer, diffusion, images, *labels,
                    torch.Generator().manual_seed(0), config, None, importance=importance)
        results.append((loss, [p.grad for p in model.parameters()]))
        if timesteps == "importance":
            proposals.append(importance.proposal())
            assert importance.loss_count.sum() == 20 * 8 + 12 and importance.weight(
                torch.tensor([100, 900])).tolist() != [1, 1]
    (loss, grads), others = results[0], results[1:]
    for other_loss, other_grads in others:
        assert other_loss.item() == pytest.approx(loss.item(), rel=1e-5)
        for g, other in zip(grads, other_grads):
            torch.testing.assert_close(other, g, rtol=1e-4, atol=1e-6)
    assert max(g.abs().max() for g in grads) > 1e-3  # gradients that could differ
    for other in proposals[1:]:
        torch.testing.assert_close(other, proposals[0], rtol=1e-5, atol=0)
    if proposals:  # and the step's losses moved it
        assert (proposals[0] - before).abs().max() > 1e-3


def test_training_flips_images_only_when_asked():
    """FLIP False: the step's loss is Algorithm 1's on the images as they are (no flip drawn); True: some flipped.
    None picks the dataset's: never for digits or Fashion-MNIST's left-pointing shoes."""
    assert default_flip("shapes") and default_flip("cifar10") and default_flip("path/to/faces")
    assert not default_flip("mnist") and not default_flip("fashion_mnist")
    torch.manual_seed(1)
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    diffusion = Diffusion(img_size=8, channels=1, device="cpu")  # predicts eps
    g = torch.Generator().manual_seed(0)
    x0 = images.float() / 127.5 - 1
    t = diffusion.sample_timesteps(8, g)
    x_t, noise = diffusion.noise_images(x0, t, torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        expected = (ConvModel()(x_t, t) - noise).square().mean()
    assert one_step(images, diffusion, flip=False)[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert one_step(images, diffusion, flip=True)[0].item() != pytest.approx(expected.item(), rel=1e-3)


def test_float16_gradients_that_overflow_skip_the_step():
    """With float16 autocast the GradScaler scales the loss up; gradients that overflow to inf skip the optimizer
    step (the weights stay as they were, never NaN) and halve the scale; a finite step updates the weights."""
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    diffusion = Diffusion(img_size=8, channels=1, device="cpu")
    before = ConvModel().conv.weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)
    loss, model = one_step(images, diffusion, amp_dtype=torch.float16, scaler=scaler)
    assert torch.isfinite(loss) and torch.equal(model.conv.weight, before)
    assert scaler.get_scale() == 2.0 ** 59
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    _, model = one_step(images, diffusion, amp_dtype=torch.float16, scaler=scaler)
    assert torch.isfinite(model.conv.weight).all() and not torch.equal(model.conv.weight, before)
    assert scaler.get_scale() == 2.0 ** 8


def test_learning_rate_schedules_at_chosen_steps():
    """Linear warm-up over LR_WARMUP steps to LR, then constant, or cosine decay to 0 at the last step."""
    from utils import learning_rate
    c = argparse.Namespace(lr=1e-3, lr_warmup=10, lr_schedule="cosine", epochs=2)  # 2 x 55 = 110 steps
    values = {step: learning_rate(c, step, 55) for step in (0, 4, 9, 10, 35, 60, 85, 109)}
    assert values[0] == pytest.approx(1e-4) and values[4] == pytest.approx(5e-4) and values[9] == pytest.approx(1e-3)
    expected = {10: 1e-3, 35: 1e-3 * (1 + 2 ** -0.5) / 2, 60: 5e-4, 85: 1e-3 * (1 - 2 ** -0.5) / 2}
    assert all(values[step] == pytest.approx(lr) for step, lr in expected.items())
    assert 0 < values[109] < 1e-6
    c.lr_schedule, c.lr_warmup = "constant", 0
    assert {learning_rate(c, step, 55) for step in (0, 50, 109)} == {1e-3}  # the tutorial's: exactly LR


@pytest.mark.parametrize("rows,cols", [(64, 200), (200, 64)])
def test_orthogonalise_keeps_the_singular_vectors_and_evens_the_singular_values(rows, cols):
    """Newton-Schulz turns g = U S V^T into U S' V^T, S' near 1 (Jordan et al.: about 0.7 to 1.2) for singular values
    down to a hundredth of the largest; the scale of g does not matter."""
    from optimizers import orthogonalise
    generator = torch.Generator().manual_seed(0)
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))[0]
    s = torch.logspace(-2, 0, k, dtype=torch.float64)
    g = u @ torch.diag(s) @ v.T
    x = orthogonalise(g * 1e3)
    in_basis = u.T @ x @ v  # diagonal: the same singular vectors
    assert (in_basis - torch.diag(torch.diag(in_basis))).abs().max() < 1e-6
    assert 0.6 < torch.diag(in_basis).min() and torch.diag(in_basis).max() < 1.25
    assert x.shape == g.shape


def test_orthogonalise_is_the_newton_schulz_iteration_on_the_matrix_itself():
    """The Gram-matrix form gives what the five quintic steps x <- 3.4445 x + (-4.7750 a + 2.0315 a^2) x, a = x x^T
    (Jordan et al.'s, on x itself) give, for wide and tall matrices."""
    from optimizers import orthogonalise
    generator = torch.Generator().manual_seed(0)
    for shape in [(32, 288), (288, 32), (64, 64)]:
        g = torch.randn(shape, generator=generator, dtype=torch.float64)
        x = g / (g.norm() + 1e-7)
        x = x.T if shape[0] > shape[1] else x
        for _ in range(5):
            a = x @ x.T
            x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
        x = x.T if shape[0] > shape[1] else x
        assert torch.allclose(orthogonalise(g), x, rtol=0, atol=1e-9)


def test_muon_steps_matrices_of_one_shape_together_as_it_steps_each_alone():
    """Muon orthogonalises the matrices of one shape as one batch: each gets exactly the step it gets alone."""
    from optimizers import Muon
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator) for shape in [(16, 8, 3, 3)] * 3 + [(8, 32), (16, 8, 3, 3)]]
    alone = [w.clone() for w in weights]
    together, each = Muon([{"params": weights, "muon": True}], lr=1e-2), [Muon([{"params": [a], "muon": True}], 1e-2)
                                                                            for a in alone]
    for _ in range(3):  # (the momentum builds up)
        for w, a in zip(weights, alone):
            w.grad = torch.randn(w.shape, generator=generator)
            a.grad = w.grad.clone()
        together.step()
        for optimizer in each:
            optimizer.step()
    assert all(torch.equal(w, a) for w, a in zip(weights, alone))


def test_muon_gives_the_other_parameters_exactly_adamws_steps():
    from optimizers import Muon
    generator = torch.Generator().manual_seed(0)
    ours = [torch.randn(5, 3, generator=generator), torch.randn(7, generator=generator)]
    torchs = [p.clone() for p in ours]
    optimizers = (Muon([{"params": ours, "muon": False}], lr=1e-2, betas=(0.9, 0.999)),
                  torch.optim.AdamW(torchs, lr=1e-2, betas=(0.9, 0.999)))
    for _ in range(20):
        for p, q in zip(ours, torchs):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(ours, torchs))


def test_muon_step_of_a_convolution_weight():
    """The first step (momentum from zero) of a weight: decay, then the gradient seen as out x in*k*k,
    orthogonalised, scaled to the RMS 0.2 x LR of an AdamW step."""
    from optimizers import Muon, orthogonalise
    weight = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    before = weight.clone()
    weight.grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    Muon([{"params": [weight], "muon": True}], lr=1e-2).step()
    update = orthogonalise(weight.grad.flatten(1)).view(weight.shape)  # 32 x 144
    expected = before * (1 - 1e-2 * 0.01) - 1e-2 * 0.2 * 144 ** 0.5 * update
    assert torch.allclose(weight, expected, rtol=0, atol=1e-6)
    change = (weight - before * (1 - 1e-2 * 0.01)).square().mean().sqrt()
    assert 0.7 * 0.2 * 1e-2 < change < 1.2 * 0.2 * 1e-2


def test_muon_takes_the_hidden_weight_matrices_and_adamw_the_rest():
    from optimizers import make_optimizer
    model = UNet_conditional(3, 3, num_classes=6, width=8, attention=(8,), norm_groups=4, film=True)
    optimizer = make_optimizer(model, 1e-3, torch.device("cpu"), "muon")
    muon, adamw = ({id(p) for p in group["params"]} for group in optimizer.param_groups)
    named = dict(model.named_parameters())
    outer = {"inc.double_conv.0.weight", "outc.weight", "label_emb.weight"}
    assert muon == {id(p) for name, p in named.items() if p.ndim >= 2 and name not in outer}
    assert adamw == {id(p) for name, p in named.items() if p.ndim < 2 or name in outer}
    assert {id(named[name]) for name in ("sa3.mha.in_proj_weight", "up1.emb_layer.1.weight")} <= muon
    assert {id(named[name]) for name in outer | {"outc.bias", "inc.double_conv.1.weight"}} <= adamw


def test_a_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run("ddpm_conditional.py", "--epochs", "1", cwd=tmp_path)
    ckpt = tmp_path / "models" / "DDPM_conditional" / "ckpt.pt"
    good = ckpt.read_bytes()
    result = run("ddpm_conditional.py", "--epochs", "2", "--lr", "1e30", cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1
    assert re.search(r"^error: the loss became (nan|inf) by step \d+: training stopped, and the last good checkpoint",
                     result.stderr, re.M)
    assert "Traceback" not in result.stderr
    assert ckpt.read_bytes() == good and final_state(tmp_path, "ddpm_conditional.py")["epoch"] == 1


@pytest.mark.parametrize("args,message", [
    (["--img_size", "30"], "error: img_size=30: height and width must be positive and divisible by 8"),
    (["--eopchs", "3"], "error: unrecognized arguments: --eopchs 3 (did you mean --epochs?)"),
    (["--logger", "mlflow"], "error: logger='mlflow': expected None, 'tensorboard' or 'wandb'"),
    (["--optimizer", "sgd"], "error: optimizer='sgd': expected 'adamw' or 'muon'"),
    (["--dataset", "no/such/folder"], "error: dataset folder 'no/such/folder' does not exist"),
    (["--num_classes", "4"], "error: labels outside num_classes: 'shapes' has 6 classes, but num_classes=4"),
    (["--epochs", "ten"], "error: --epochs ten: expected a value of type int (the default is 24)"),
    (["--epochs", "2.5"], "error: --epochs 2.5: expected a value of type int (the default is 24)"),
    (["--num_images", "abc"], "error: --num_images abc: expected a value of type int (the default is None)"),
    (["--device", "gpu"], "error: device 'gpu': expected auto, cpu, cuda, cuda:N or mps"),
    (["--amp", "fp8"], "error: amp='fp8': expected True (automatic), False, 'bf16' or 'fp16'"),
    (["--attributes", "circle,"], "error: attributes='circle,': expected distinct names separated by commas"),
    (["--attributes", "circle"], "error: attributes='circle': 'shapes' has classes, not attributes"),
    (["--dataset", "multishapes", "--num_classes", "4"],
     "error: num_classes=4: 'multishapes' has 6 attributes, and a multi-label model has one class per attribute"),
    (["--num_images", "0"], "error: num_images=0: expected a number of images, 1 or more (None: all)"),
    (["--num_images", "-5"], "error: num_images=-5: expected a number of images, 1 or more (None: all)"),
    (["--run_name", ""], "error: run_name='': expected a name for the run's folders in models/ and results/"),
    (["--run_name", "../elsewhere"], "error: run_name='../elsewhere': expected a name for the run's folders"),
    (["--epoch", "1"], "error: unrecognized arguments: --epoch 1 (did you mean --epochs?)"),  # not a prefix of it
    (["--cfg_scale", "-1"], "error: cfg_scale=-1.0: expected 0 or more (1: conditional, above 1: guided)"),
])
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, args, message):
    """In this process, as `python ddpm_conditional.py ...` runs it (the next test runs one case as a command)."""
    import ddpm_conditional
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", command("ddpm_conditional.py", *args)[1:])
    with pytest.raises(SystemExit) as stop, clear_errors():  # sys.exit(text): the text on stderr, exit status 1
        ddpm_conditional.train(parse_config(vars(ddpm_conditional)))
    assert str(stop.value).startswith(message) and "\n" not in str(stop.value)


def test_bad_input_nothing_was_written_for(tmp_path):
    """The refusals above start nothing: no folder appears (a run named "" would have written straight into models/
    and results/)."""
    for args in (["--run_name", ""], ["--num_images", "0"]):
        assert run("ddpm.py", *args, cwd=tmp_path, expect_ok=False).returncode == 1
    assert list(tmp_path.iterdir()) == []


def test_sampling_refuses_labels_below_minus_one_and_negative_guidance_and_a_train_state_file(tmp_path):
    from ddpm import load_run
    diffusion, model = Diffusion(img_size=8, device="cpu"), UNet_conditional(num_classes=4, width=8).eval()
    with pytest.raises(UserError, match=r"^label -2: expected a class index, or -1 for none$"):
        diffusion.sample(model, 2, torch.tensor([1, -2]), steps=2, progress=False)
    with pytest.raises(UserError, match=r"^cfg_scale=-0.5: expected 0 or more"):
        diffusion.sample(model, 2, torch.tensor([1, -1]), cfg_scale=-0.5, steps=2, progress=False)
    images, mask = torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.ones(1, 1, 8, 8)
    for edit in (lambda: diffusion.img2img(model, images, 0.5, torch.tensor([1, 2]), cfg_scale=-0.5, steps=2),
                 lambda: diffusion.inpaint(model, images, mask, torch.tensor([1, 2]), cfg_scale=-0.5, steps=2)):
        with pytest.raises(UserError, match=r"^cfg_scale=-0.5: expected 0 or more"):  # every sampler refuses it
            edit()
    run("ddpm_conditional.py", "--epochs", "1", cwd=tmp_path)
    state = tmp_path / "models" / "DDPM_conditional" / "train_state.pt"
    with pytest.raises(UserError, match=r"train_state\.pt' is a train_state\.pt \(all that a resume needs\), not a "
                                        r"model's weights: load the run's folder or its ema_ckpt\.pt"):
        load_run(state, "cpu")


def test_a_preset_gives_each_script_its_own_run_folder():
    """The two scripts with one preset: models/fashion and models/fashion_uncond (as ddpm.py's __main__ asks: the
    first-look test runs it), so neither refuses the other's run; --run_name still names it."""
    import ddpm
    import ddpm_conditional
    preset = str(REPO / "config" / "fashion_mnist.py")
    ignore = ("NUM_CLASSES", "ATTRIBUTES", "CFG_DROP", "CFG_SCALE")
    assert parse_config(vars(ddpm_conditional), [preset]).run_name == "fashion"
    assert parse_config(vars(ddpm), [preset], ignore, preset_run_suffix="_uncond").run_name == "fashion_uncond"
    assert parse_config(vars(ddpm), [preset, "--run_name", "x"], ignore, preset_run_suffix="_uncond").run_name == "x"


def test_the_first_look_preset_trains_a_few_steps_and_writes_a_grid(tmp_path):
    """config/first_look.py, the README's one-minute look: the real command (the CPU, fp32), a few dozen steps, each
    epoch's grid, progress.gif and loss.png, in a folder of its own."""
    result = subprocess.run([sys.executable, str(REPO / "ddpm.py"), str(REPO / "config" / "first_look.py"),
                             "--device", "cpu", "--amp", "False"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=PATIENCE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "640 images, 20 steps per epoch" in result.stdout
    results = tmp_path / "results" / "first_look_uncond"
    assert {p.name for p in results.iterdir()} == {"1.jpg", "2.jpg", "loss.png", "progress.gif"}
    assert Image.open(results / "2.jpg").size == (2 + 8 * 34, 2 + 8 * 34)  # 8 x 8 images of 32 x 32


def test_bad_input_stops_the_command_with_one_line_and_status_1(tmp_path):
    result = subprocess.run(command("ddpm_conditional.py", "--epochs", "ten"), cwd=tmp_path, capture_output=True,
                            text=True, timeout=PATIENCE)  # a real command: its exit status and what it prints
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --epochs ten: expected a value of type int (the default is 24)")


@pytest.mark.parametrize("args,difference", [
    (["--width", "16"], "width=8, now 16"),
    (["--prediction", "eps"], "prediction='v', now 'eps'"),  # the checkpoint predicts v: not loaded as eps
])
def test_resuming_with_other_settings_names_them(tmp_path, args, difference):
    run("ddpm.py", "--epochs", "1", cwd=tmp_path)
    result = run("ddpm.py", "--epochs", "2", *args, cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1
    assert f"holds a run with other settings ({difference}): pass another --run_name" in result.stderr


def test_importing_the_scripts_starts_nothing(tmp_path):
    code = "import data, ddpm, ddpm_conditional, evaluate, benchmark, modules, optimizers, utils"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "" and list(tmp_path.iterdir()) == []


def test_the_tutorials_notebook_lines_work():
    """`from ddpm_conditional import *` (or ddpm) gives the tutorial's names, and its sampling call runs."""
    names = {}
    exec("from ddpm import *", names)
    assert {"Diffusion", "UNet", "plot_images", "load_run"} <= names.keys()
    names = {}
    exec("from ddpm_conditional import *", names)
    assert {"Diffusion", "UNet_conditional", "plot_images", "load_run", "EMA"} <= names.keys()
    torch.manual_seed(0)
    model = names["UNet_conditional"](num_classes=4, width=8)
    diffusion = names["Diffusion"](noise_steps=100, img_size=8, device="cpu")  # (its T of 1000: 10 times the time)
    labels = torch.arange(4)
    x = diffusion.sample(model, 4, labels, cfg_scale=3)  # the tutorial's call: all T ancestral steps
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.uint8
    # its other calls, as it makes them: the unconditional sample, the forward process, t, the EMA
    unconditional = names["UNet"] if "UNet" in names else importlib.import_module("modules").UNet
    x = diffusion.sample(unconditional(width=8), 2)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.uint8
    t = diffusion.sample_timesteps(5)
    assert t.shape == (5,) and t.dtype == torch.long and 0 <= t.min() and t.max() < 100
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    x_t, noise = diffusion.noise_images(images, t)
    alpha_hat = diffusion.alpha_hat[t][:, None, None, None]
    torch.testing.assert_close(x_t, alpha_hat.sqrt() * images + (1 - alpha_hat).sqrt() * noise)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    names["EMA"](0.995).step_ema(ema_model, model)  # its 2000 warm-up steps: a copy
    assert all(torch.equal(a, b) for a, b in zip(ema_model.parameters(), model.parameters()))
    assert names["UNet_conditional"](num_classes=10).label_emb.weight.shape == (10, 256)


def notebook_cells():
    """sample.ipynb's code cells: (the main ones in order, the attributes cell)."""
    cells = [c for c in json.loads((REPO / "sample.ipynb").read_text())["cells"] if c["cell_type"] == "code"]
    main = ["".join(c["source"]) for c in cells if "attributes" not in c["metadata"].get("tags", [])]
    [attributes] = ["".join(c["source"]) for c in cells if "attributes" in c["metadata"].get("tags", [])]
    return main, attributes


def test_readme_notebook_cells_sample_from_a_trained_checkpoint(tmp_path, monkeypatch, uninterrupted):
    """sample.ipynb's cells in order, run here in this process: sampling (DDIM, then DPM++), the denoising GIF,
    inpainting (the kept half comes back as it was) and img2img."""
    import matplotlib
    matplotlib.use("Agg")  # plt.show() draws nowhere
    monkeypatch.chdir(uninterrupted["ddpm_conditional.py"])
    namespace = {}
    first, *others = notebook_cells()[0]
    exec(first, namespace)
    images = namespace["x"]
    assert images.dtype == torch.uint8 and images.shape == (namespace["n"], 3, 16, 16)
    for cell in others:
        exec(cell, namespace)
    n, frames, real, filled = namespace["n"], namespace["frames"], namespace["real"], namespace["filled"]
    assert Image.open("denoising.gif").n_frames > 1 and frames[-1].shape == (n, 3, 16, 16)
    # (the cells sample on the device load_run picks, a GPU where there is one; the real images are on the CPU)
    assert filled.shape == (n, 3, 16, 16) and torch.equal(filled.cpu()[..., :8], real.images[..., :8])
    assert namespace["x"].shape == namespace["circles"].shape == (n, 3, 16, 16)


TUTORIAL = dict(dataset="cifar10", img_size=64, num_classes=None, width=64, attention=(1, 2, 4, 8), epochs=300,
                batch_size=14, lr=3e-4, cfg_drop=0.1, cfg_scale=3.0, ema_beta=0.995, ema_start=2000, norm_groups=1,
                film=False, schedule="linear", prediction="eps", loss_weighting="none", timesteps="uniform",
                lr_warmup=0, lr_schedule="constant", optimizer="adamw", sampler="ancestral", sample_steps=1000,
                grad_accum=1)  # the tutorial's conditional script (num_classes None: CIFAR-10's 10)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_tutorial_preset_gives_the_tutorials_setting_and_its_checkpoints_keys(script, tmp_path, monkeypatch):
    """The demo's defaults depart from the tutorial; config/tutorial.py undoes every departure, its grid sampler
    included, and builds a model whose state-dict keys and shapes are those of the tutorial's checkpoints. Options
    given after a preset override it; a preset that sets an unknown constant is refused, naming it."""
    from ddpm import make_diffusion, make_model
    module = importlib.import_module(script.removesuffix(".py"))
    conditional = script == "ddpm_conditional.py"
    ignore = ("NUM_CLASSES", "ATTRIBUTES", "CFG_DROP", "CFG_SCALE")  # as ddpm.py does: the conditional script's
    config = parse_config(vars(module), [str(REPO / "config" / "tutorial.py")], ignore)
    expected = {k: v for k, v in TUTORIAL.items() if conditional or k not in ("num_classes", "cfg_drop", "cfg_scale")}
    assert {k: getattr(config, k) for k in expected} == expected
    diffusion = make_diffusion(argparse.Namespace(**vars(config), channels=3), "cpu")
    assert (diffusion.noise_steps, diffusion.beta_start, diffusion.beta_end) == (1000, 1e-4, 0.02)
    config.channels, config.num_classes = 3, 10 if conditional else None  # as CIFAR-10 completes it
    reference = (REPO / "tests" / "reference" / f"tutorial_{'cond' if conditional else 'uncond'}64_keys.txt")
    keys = [line.split("\t") for line in reference.read_text().splitlines() if line.strip()]
    model = make_model(config)
    assert [(k, str(tuple(v.shape))) for k, v in model.state_dict().items()] == [(k, s) for k, s in keys]
    assert parse_config(vars(module), [str(REPO / "config" / "tutorial.py"), "--epochs", "2"], ignore).epochs == 2
    (tmp_path / "typo.py").write_text("EPOCS = 3\n")
    with pytest.raises(UserError, match=r"typo.py sets EPOCS, which is not a constant of this script \(did you mean "
                                        r"EPOCHS\?\)"):
        parse_config(vars(module), [str(tmp_path / "typo.py")])


def test_grid_labels_a_row_per_attribute_then_the_first_two_and_three_together():
    from ddpm_conditional import grid_labels
    three = grid_labels(argparse.Namespace(multi_label=True, num_classes=3), per_row=2)
    assert three.tolist() == [[1, 0, 0]] * 2 + [[0, 1, 0]] * 2 + [[0, 0, 1]] * 2 + [[1, 1, 0]] * 2 + [[1, 1, 1]] * 2
    forty = grid_labels(argparse.Namespace(multi_label=True, num_classes=40), per_row=1)
    assert forty.shape == (10, 40) and torch.equal(forty[:8], torch.eye(40)[:8])  # at most 8 single attributes
    assert forty[8:].sum(1).tolist() == [2, 3] and forty[9, :3].tolist() == [1, 1, 1]
    assert grid_labels(argparse.Namespace(multi_label=True, num_classes=1), per_row=1).tolist() == [[1]]
    assert grid_labels(argparse.Namespace(multi_label=False, num_classes=12), per_row=1).tolist() == list(range(10))


def test_an_attribute_table_run_and_the_readme_attributes_cell(tmp_path, monkeypatch):
    """A tiny run on a CelebA-format table, --attributes Smiling,Eyeglasses (in process): config.json records
    multi-hot labels and the attributes in that order; the grid has a row for each and one of both; the README's
    attributes cell samples smiling + eyeglasses from it."""
    import matplotlib
    import ddpm_conditional
    from data import draw_multishapes
    matplotlib.use("Agg")
    shapes = draw_multishapes(20, (16, 16))
    (tmp_path / "img_align_celeba").mkdir()
    lines = ["20", "Male Smiling Eyeglasses"]
    for i, (image, label) in enumerate(zip(shapes.images, shapes.labels)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "img_align_celeba" / f"{i:06d}.png")
        lines.append(f"{i:06d}.png " + " ".join("1" if v else "-1" for v in label[:3].tolist()))
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    config = parse_config(vars(ddpm_conditional), TINY + ["--dataset", "list_attr_celeba.txt", "--run_name", "celeba",
                                                          "--attributes", "Smiling,Eyeglasses", "--epochs", "1",
                                                          "--batch_size", "6"])
    ddpm_conditional.train(config)
    saved = json.loads(Path("models/celeba/config.json").read_text())
    assert (saved["multi_label"], saved["num_classes"], saved["classes"]) == (True, 2, ["Smiling", "Eyeglasses"])
    assert Image.open("results/celeba/1.jpg").size == (2 + 8 * 18, 2 + 3 * 18)  # Smiling, Eyeglasses, both
    namespace = {}
    cell = notebook_cells()[1]
    exec(cell, namespace)
    assert namespace["y"].tolist() == [[1, 1]] * 8 and namespace["x"].shape == (8, 3, 16, 16)


def test_the_tests_train_on_the_cpu_even_where_a_gpu_is(tmp_path, auto_is_not_the_cpu):
    """TINY names the CPU: on a GPU machine `auto` would train on the GPU, where the exact-resume checks do not hold
    (non-deterministic kernels); tests/test_accelerator.py is the suite's GPU part. Here "auto" is made to pick a
    stand-in device ("meta", where training fails) to show that no run of the suite asks for it."""
    assert "on cpu" in run("ddpm.py", "--epochs", "1", cwd=tmp_path).stdout
    (tmp_path / "auto").mkdir()
    with pytest.raises(Exception):  # (the stand-in does fail)
        run("ddpm.py", "--epochs", "1", "--device", "auto", cwd=tmp_path / "auto")


def test_ctrl_c_saves_at_the_next_step_and_the_run_resumes_exactly(tmp_path):
    """SIGINT mid-epoch: a checkpoint at the next step boundary, one line, exit status 1; the same command then
    finishes with the weights of a run never stopped (no steps lost, none repeated)."""
    args = ("--epochs", "2", "--num_images", "480", "--lr_schedule", "constant")  # 30 steps an epoch
    process = subprocess.Popen(command("ddpm.py", *args), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    seen = ""  # the progress bar so far: wait for a step done (however slow the machine), then Ctrl-C
    while not re.search(r"epoch 1/2: +\d+%\|[^|]*\| +[1-9]\d*/30", seen):
        chunk = os.read(process.stderr.fileno(), 4096).decode()
        assert chunk, f"the run ended before its first step: {seen[-2000:]}"
        seen += chunk
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=PATIENCE)
    err = seen + err
    assert process.returncode == 1 and re.search(r"^stopped after step (\d+), saved in models/DDPM_unconditional: "
                                                 r"run the same command to resume$", err, re.M), err[-2000:]
    assert "Ctrl-C: saving after this step, then stopping (Ctrl-C again stops at once)" in err  # said at once
    stopped = int(re.search(r"stopped after step (\d+)", err).group(1))
    state = final_state(tmp_path, "ddpm.py")
    assert state["step"] == stopped < 60 and state["batch"] == stopped % 30 != 0  # mid-epoch, that very step
    resumed = run("ddpm.py", *args, cwd=tmp_path).stdout
    assert f"step {stopped}" in resumed
    whole = tmp_path / "whole"
    whole.mkdir()
    run("ddpm.py", *args, cwd=whole)
    assert final_state(tmp_path, "ddpm.py")["step"] == 60  # the logged losses too: the window since the last
    assert_same_training(final_state(tmp_path, "ddpm.py"), final_state(whole, "ddpm.py"))  # readout was saved


@pytest.mark.parametrize("saved", [False, True])
def test_a_second_ctrl_c_stops_at_once_saying_what_is_kept(tmp_path, capsys, saved):
    """The loop's Ctrl-C handler (the two presses sent to this process): the first says at once that the run saves
    after this step; the second stops at once, saying that the last checkpoint is kept, or, before the first one
    (the first epoch), that nothing was saved."""
    from utils import save_and_stop_on_ctrl_c
    models = tmp_path / "models" / "run"
    if saved:
        models.mkdir(parents=True)
        (models / "train_state.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        with save_and_stop_on_ctrl_c(models) as interrupted:
            assert not interrupted()
            os.kill(os.getpid(), signal.SIGINT)
            assert interrupted()
            assert "Ctrl-C: saving after this step, then stopping" in capsys.readouterr().err
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # (the second press lands here)
    expected = (f"stopped at once: the last checkpoint in {models} is kept; run the same command to resume" if saved
                else "stopped at once, before the first checkpoint: nothing was saved")
    assert str(stop.value) == expected


def test_a_run_that_fails_leaves_no_empty_folders_and_a_missing_run_is_named(tmp_path, monkeypatch):
    """models/<run> and results/<run> appear with their first file; load_run of a run that does not exist names the
    folder and lists the runs that do."""
    from ddpm import load_run
    result = run("ddpm.py", "--dataset", "no/such/folder", cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and list(tmp_path.iterdir()) == []
    run("ddpm_conditional.py", "--epochs", "1", "--run_name", "shapes16", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^no run folder 'models/DDPM_conditional': the runs in models are shapes16$"):
        load_run("models/DDPM_conditional")
    with pytest.raises(UserError, match=r"^no run folder 'nowhere/run' \(and no runs in 'nowhere'\)$"):
        load_run("nowhere/run/ema_ckpt.pt")


def test_the_loss_and_the_grids_go_to_tensorboard_when_asked(tmp_path):
    """LOGGER = "tensorboard" (the tutorial's): runs/<RUN_NAME>/ holds every loss readout of loss.png and the
    learning rate (of the step logged: warming up here), at its step, and each epoch's sample grid as an image (the
    Images tab), across a resume too. (Skipped where the tensorboard package is not installed.)"""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run("ddpm.py", "--epochs", "1", "--logger", "tensorboard", cwd=tmp_path)
    run("ddpm.py", "--epochs", "2", "--logger", "tensorboard", cwd=tmp_path)
    events = EventAccumulator(str(tmp_path / "runs" / "DDPM_unconditional"), size_guidance={"images": 0})
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("loss")]
    losses = final_state(tmp_path, "ddpm.py")["losses"]
    assert [step for step, _ in logged] == [step for step, _ in losses] == [3, 6]
    assert [value for _, value in logged] == pytest.approx([loss for _, loss in losses], rel=1e-6)
    assert [event.step for event in events.Scalars("lr")] == [3, 6]
    assert [event.value for event in events.Scalars("lr")] == pytest.approx([2e-3 * 3 / 200, 2e-3 * 6 / 200])
    grids = events.Images("samples")
    assert [event.step for event in grids] == [3, 6]  # one an epoch, at its last step
    for event, epoch in zip(grids, (1, 2)):  # the grid written to results/, 8 x 8 images of 16 x 16
        assert (event.width, event.height) == Image.open(tmp_path / "results" / "DDPM_unconditional" /
                                                         f"{epoch}.jpg").size == (2 + 8 * 18, 2 + 8 * 18)


def test_the_loss_goes_to_weights_and_biases_offline_when_asked(tmp_path, monkeypatch):
    """LOGGER = "wandb" with WANDB_MODE=offline: no network, the run is written under ./wandb/. (Skipped where the
    wandb package is not installed.)"""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run("ddpm.py", "--epochs", "1", "--logger", "wandb", cwd=tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_help_shows_each_constants_comment_grouped_and_the_docstrings_commands(capsys):
    """--help: every option with its comment from the script (allowed values included) under the script's group
    titles, bare flags for booleans, and the docstring's example commands on their own lines."""
    import ddpm_conditional
    with pytest.raises(SystemExit):
        parse_config(vars(ddpm_conditional), ["--help"])
    out = capsys.readouterr().out
    assert "\n    python ddpm_conditional.py config/tutorial.py       # the tutorial's setting" in out
    for title in ("the tutorial's knobs:", "beyond the tutorial: the measured recipe (docs/measurements.md):",
                  "data and machine:"):
        assert f"\n{title}\n" in out
    flat = " ".join(out.split())
    assert '--schedule VALUE "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020; tutorial) (default: ' \
           "'cosine')" in flat
    assert "--timesteps VALUE how training draws t: \"importance\"" in flat and '"uniform" (tutorial)' in flat
    assert "--compile [BOOL] torch.compile the model (default: False)" in flat
    assert parse_config(vars(ddpm_conditional), ["--compile"]).compile is True
    assert parse_config(vars(ddpm_conditional), ["--compile", "True"]).compile is True
    # the three options of the machine that are not constants (options.MACHINE_OPTIONS), in the machine's group
    machine = out.partition("\ndata and machine:\n")[2]
    assert "--data_dir VALUE" in machine and "--save_every VALUE" in machine and "--compile [BOOL]" in machine
    assert "where torchvision datasets are downloaded to / looked for (default: 'data')" in flat
    import ddpm
    assert not hasattr(ddpm_conditional, "COMPILE") and not hasattr(ddpm, "DATA_DIR")
    c = parse_config(vars(ddpm), ["--save_every", "5", "--data_dir", "elsewhere"])
    assert (c.save_every, c.data_dir, c.compile) == (5, "elsewhere", False)


def test_a_preset_may_set_the_options_of_the_machine_that_no_script_lists(tmp_path):
    """DATA_DIR, SAVE_EVERY and COMPILE in a preset, as before they left the scripts' constants."""
    import ddpm_conditional
    preset = tmp_path / "machine.py"
    preset.write_text('DATA_DIR = "/data"\nSAVE_EVERY = 100\nCOMPILE = True\n')
    c = parse_config(vars(ddpm_conditional), [str(preset)])
    assert (c.data_dir, c.save_every, c.compile) == ("/data", 100, True)


def test_no_file_imports_one_that_imports_it_back():
    """The repo's files import each other in one direction only (data <- utils <- options <- ddpm <- the rest)."""
    import ast
    files = {path.stem: path for path in REPO.glob("*.py")}
    imports = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        found = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                             if isinstance(node, ast.ImportFrom) and node.module}
        imports[name] = found & files.keys()

    def reaches(start, goal, seen=()):
        return any(other == goal or (other not in seen and reaches(other, goal, (*seen, other)))
                   for other in imports[start])

    assert imports["ddpm_conditional"] >= {"ddpm"} and "training" not in files
    assert [name for name in files if reaches(name, name)] == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_grid_with_the_ancestral_sampler_takes_every_step_whatever_sample_steps_says(script):
    """SAMPLER = "ancestral" (the tutorial preset's) with SAMPLE_STEPS 20: every step, not a refusal after epoch 1."""
    module = importlib.import_module(script.removesuffix(".py"))
    config = argparse.Namespace(seed=0, sampler="ancestral", sample_steps=20, multi_label=False, num_classes=6,
                                cfg_scale=3.0)
    diffusion = Diffusion(noise_steps=10, img_size=8, device="cpu")
    model = (UNet_conditional(num_classes=6, width=8, attention=()) if script == "ddpm_conditional.py" else
             __import__("modules").UNet(width=8, attention=()))
    images = module.sample_grid(diffusion, model, config, None, torch.device("cpu"))
    assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.uint8
