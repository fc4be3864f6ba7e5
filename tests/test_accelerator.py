"""On the GPU at hand (CUDA, or Apple MPS): each script trains there with the automatic precision (bf16 where native,
fp16 with a loss scaler on older CUDA GPUs) and torch.compile, samples with guidance, evaluate.py measures the run
there, and the run resumes on the CPU; guided samples there match the CPU's; data held on the GPU is batched without
making the host wait; with two or more CUDA GPUs, torchrun trains under NCCL. Skipped without an accelerator (CI is
CPU-only). Run it on a GPU machine with

    python -m pytest -q tests/test_accelerator.py

DDPM_TEST_DEVICE=cpu runs these tests on the CPU, to check the tests themselves.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm import Diffusion
from modules import UNet_conditional
from utils import amp_dtype, autocast, pick_device

REPO = Path(__file__).resolve().parent.parent
DEVICE = os.environ.get("DDPM_TEST_DEVICE") or (
    "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA or MPS device here (DDPM_TEST_DEVICE=cpu forces one)")
TINY = ["--num_images", "48", "--img_size", "16", "--width", "8", "--batch_size", "16", "--sample_steps", "2",
        "--ema_start", "2"]
RUN = {"ddpm.py": "DDPM_unconditional", "ddpm_conditional.py": "DDPM_conditional"}


def run(cwd, *command):
    result = subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_guided_samples_there_match_the_cpu():
    """The same weights and starting noise: DDIM with guidance on the device, in its automatic precision, gives the
    CPU's fp32 images up to rounding."""
    device = pick_device(DEVICE)
    torch.manual_seed(0)
    model = UNet_conditional(3, 3, num_classes=4, width=16).eval()
    noise, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    reference = Diffusion(img_size=16, device="cpu").denoise(model, noise, labels, cfg_scale=3, steps=10)
    diffusion = Diffusion(img_size=16, device=device)
    with autocast(device, amp_dtype(device)):
        images = diffusion.denoise(model.to(device), noise.to(device), labels.to(device), cfg_scale=3, steps=10)
    assert images.device.type == device.type
    difference = (images.float().cpu() - reference).abs().mean().item()
    assert difference < 0.03  # of the range [-1, 1]: a few pixel levels
    assert reference.std().item() > 0.2  # (the images are not flat, where any two samplers would agree)


@pytest.mark.skipif(DEVICE != "cuda", reason="a CUDA check")
def test_in_memory_batches_make_the_gpu_wait_for_nothing():
    """Batches of data held on the GPU are indexed there: after the epoch's permutation moves to the GPU (once, at
    the epoch's start), no batch makes the host wait for the device (torch's sync debug mode would raise)."""
    from data import draw_shapes
    from data import get_data
    batches = iter(get_data(draw_shapes(64, (8, 8)), 16, device=torch.device("cuda")))
    next(batches)
    torch.cuda.set_sync_debug_mode("error")
    try:
        images = [images for images, labels in batches]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(images) == 3 and images[0].device.type == "cuda"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One data folder for the module's evaluate.py runs: the classifier it caches there trains once, not once a
    run."""
    return tmp_path_factory.mktemp("data")


# (the quickest first: a run cut at its limit has done them; eager before compiled, the cold compiles slowest)
@pytest.mark.parametrize("script", list(RUN))
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_train_sample_and_evaluate_there_then_resume_on_the_cpu(tmp_path, data_dir, script, compile):
    out = run(tmp_path, str(REPO / script), *TINY, "--device", DEVICE, "--epochs", "1", "--compile", str(compile))
    amp = amp_dtype(pick_device(DEVICE))
    assert f"on {DEVICE}" in out and (f"with {str(amp)[6:]} autocast" in out if amp else "autocast" not in out)
    models = tmp_path / "models" / RUN[script]
    state = torch.load(models / "train_state.pt", weights_only=True)  # (no map_location: where it was saved)
    assert state["generator_device"] == pick_device(DEVICE).type and state["step"] == 3
    tensors = [v for part in ("model", "ema_model") for v in state[part].values()] + [
        v for moments in state["optimizer"]["state"].values() for v in moments.values() if torch.is_tensor(v)]
    assert {v.device.type for v in tensors} == {"cpu"}  # fused AdamW's step too: the file loads on any machine
    assert all(torch.isfinite(v).all() for v in state["ema_model"].values())
    assert all(loss == loss and loss < 10 for _, loss in state["losses"])  # finite, not diverging
    assert (tmp_path / "results" / RUN[script] / "1.jpg").exists()  # the guided sample grid, sampled there

    report = tmp_path / "report.json"
    run(tmp_path, str(REPO / "evaluate.py"), "--ckpt", str(models / "ema_ckpt.pt"), "--device", DEVICE,
        "--n_per_class", "4", "--steps", "3", "--json", str(report), "--data_dir", str(data_dir))
    figures = json.loads(report.read_text())
    assert figures["main"]["fd"] > 0 and figures["classifier_accuracy_real"] > 0.9
    if script == "ddpm_conditional.py":
        assert 0 <= figures["main"]["accuracy"] <= 1

    out = run(tmp_path, str(REPO / script), *TINY, "--device", "cpu", "--epochs", "2")  # (compiling on a CPU is slow)
    assert "resuming" in out
    if DEVICE != "cpu":
        assert f"resuming on cpu a run saved on {pick_device(DEVICE).type}" in out
    state = torch.load(models / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["generator_device"] == "cpu"
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs")
def test_torchrun_on_two_gpus_with_nccl(tmp_path):
    """Two processes, a GPU each (NCCL): the ranks hold identical weights after a stop and a resume."""
    from test_distributed import WORKER
    (tmp_path / "worker.py").write_text(WORKER)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "worker.py"]
    run(tmp_path, *launcher, *TINY, "--device", "cuda", "--epochs", "1")
    out = run(tmp_path, *launcher, *TINY, "--device", "cuda", "--epochs", "2")
    assert out.count("resuming") == 1 and "2 processes" in out
    rank0, rank1 = (torch.load(tmp_path / f"weights_rank{rank}.pt", weights_only=True) for rank in (0, 1))
    for part in ("model", "ema_model"):
        assert all(torch.equal(rank0[part][k].cpu(), rank1[part][k].cpu()) for k in rank0[part]), part
