"""End to end: each script trains a few steps on tiny built-in data, writes its files, resumes to the very same
weights (after a clean stop or a kill at any moment), stops on bad input with one clear line; the README's notebook
cell samples from what it wrote."""
import argparse
import json
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

REPO = Path(__file__).resolve().parent.parent
TINY = ["--num_images", "48", "--img_size", "16", "--width", "8", "--batch_size", "16", "--sample_steps", "2",
        "--ema_start", "2", "--log_every", "1", "--amp", "False"]
RUN = {"ddpm.py": "DDPM_unconditional", "ddpm_conditional.py": "DDPM_conditional"}
SCRIPTS = list(RUN)


def command(script, *args):
    return [sys.executable, str(REPO / script), *TINY, *args]


def run(script, *args, cwd, expect_ok=True):
    result = subprocess.run(command(script, *args), cwd=cwd, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_state(cwd, script):
    return torch.load(Path(cwd) / "models" / RUN[script] / "train_state.pt", weights_only=True)


def assert_same_training(a, b):
    for part in ("model", "ema_model"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(), b["optimizer"]["state"][0].values()))
    assert (a["step"], a["epoch"], a["ema_step"]) == (b["step"], b["epoch"], b["ema_step"])
    assert torch.equal(a["generator"], b["generator"])


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
    models, results = tmp_path / "models" / RUN[script], tmp_path / "results" / RUN[script]
    assert {p.name for p in models.iterdir()} == {"ckpt.pt", "ema_ckpt.pt", "train_state.pt", "config.json"}
    assert {p.name for p in results.iterdir()} == {"1.jpg", "2.jpg", "loss.png"}
    config = json.loads((models / "config.json").read_text())
    assert config["channels"] == 3 and config.get("num_classes") == (6 if script == "ddpm_conditional.py" else None)

    # the checkpoints are plain state dicts, loadable the tutorial's way
    from ddpm import make_model
    model = make_model(argparse.Namespace(**config))
    model.load_state_dict(torch.load(models / "ema_ckpt.pt", weights_only=True))
    grid = Image.open(results / "2.jpg")  # a row of 8 per class (6 shapes), or 8 x 8 without classes
    assert grid.size == (2 + 8 * 18, 2 + (6 if config.get("num_classes") else 8) * 18)

    second = run(script, "--epochs", "3", cwd=tmp_path)  # the same command, more epochs: it resumes
    assert "resuming" in second.stdout and "at epoch 3, step 6" in second.stdout
    assert_same_training(final_state(tmp_path, script), final_state(uninterrupted[script], script))
    assert "nothing to do" in run(script, "--epochs", "3", cwd=tmp_path).stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_killed_at_any_moment_then_resumed_gives_identical_weights(script, tmp_path, uninterrupted):
    """A checkpoint every step; kill -9 soon after the first one appears (mid-epoch, while writing, ...): the files
    left are whole, and running the command again finishes with the uninterrupted run's weights."""
    args = ("--epochs", "3", "--save_every", "1")
    process = subprocess.Popen(command(script, *args), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    state = tmp_path / "models" / RUN[script] / "train_state.pt"
    deadline = time.time() + 120
    while not state.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = torch.load(state, weights_only=True)  # whole, whenever the kill came
    torch.load(state.with_name("ckpt.pt"), weights_only=True)
    assert 1 <= interrupted["step"] <= 9
    run(script, *args, cwd=tmp_path)
    assert_same_training(final_state(tmp_path, script), final_state(uninterrupted[script], script))


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
    (["--dataset", "no/such/folder"], "error: dataset folder 'no/such/folder' does not exist"),
    (["--num_classes", "4"], "error: labels outside num_classes: 'shapes' has 6 classes, but num_classes=4"),
    (["--epochs", "ten"], "error: --epochs ten: expected a value of type int (the default is 24)"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    result = run("ddpm_conditional.py", *args, cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and result.stderr.startswith(message) and result.stderr.count("\n") == 1


@pytest.mark.parametrize("args,difference", [
    (["--width", "12"], "width=8, now 12"),
    (["--prediction", "eps"], "prediction='v', now 'eps'"),  # the checkpoint predicts v: not loaded as eps
])
def test_resuming_with_other_settings_names_them(tmp_path, args, difference):
    run("ddpm.py", "--epochs", "1", cwd=tmp_path)
    result = run("ddpm.py", "--epochs", "2", *args, cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1
    assert f"holds a run with other settings ({difference}): pass another --run_name" in result.stderr


def test_importing_the_scripts_starts_nothing(tmp_path):
    code = "import ddpm, ddpm_conditional, modules, utils"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "" and list(tmp_path.iterdir()) == []


def readme_notebook_cell():
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- notebook cell -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README.md has no notebook cell"
    return match.group(1)


def test_readme_notebook_cell_samples_from_a_trained_checkpoint(tmp_path, monkeypatch, uninterrupted):
    import matplotlib
    matplotlib.use("Agg")  # plt.show() draws nowhere
    monkeypatch.chdir(uninterrupted["ddpm_conditional.py"])
    namespace = {}
    exec(readme_notebook_cell(), namespace)
    images = namespace["x"]
    assert images.dtype == torch.uint8 and images.shape == (namespace["n"], 3, 16, 16)
