"""The shipped weights, pretrained/shapes (conditional) and pretrained/shapes_uncond: half-precision files that load
on the CPU as float32, denoise real shapes, and the conditional one draws the shapes asked for, as judged by
evaluate.py's classifier for the shapes (tests/reference/shapes_classifier_32x32_c3.pt, the one `python evaluate.py
--ckpt pretrained/shapes/ema_ckpt.pt` trained): a change to the UNet, the samplers or the loading that breaks them is
caught here."""
from pathlib import Path

import torch

import evaluate
from checkpoints import load_weights, read_checkpoint
from ddpm import load_run

REPO = Path(__file__).resolve().parent.parent
SAMPLES = dict(steps=20, progress=False)


def shapes_classifier():
    return load_weights(evaluate.Classifier(3, 6), REPO / "tests" / "reference" / "shapes_classifier_32x32_c3.pt")


def test_the_shipped_weights_are_half_precision_files_that_load_as_float32():
    for run in ("shapes", "shapes_uncond"):
        folder = REPO / "pretrained" / run
        assert (folder / "ema_ckpt.pt").stat().st_size < 4 * 2 ** 20  # small enough to ship
        assert {v.dtype for v in read_checkpoint(folder / "ema_ckpt.pt").values() if v.is_floating_point()} == {
            torch.float16}
        diffusion, model = load_run(folder, "cpu")
        assert {p.dtype for p in model.state_dict().values() if p.is_floating_point()} == {torch.float32}
        assert diffusion.device.type == "cpu" and diffusion.img_size == (32, 32)


def test_the_conditional_weights_draw_the_shapes_asked_for():
    diffusion, model = load_run(REPO / "pretrained" / "shapes", "cpu")
    labels = torch.arange(6).repeat_interleave(4)  # 4 of each shape
    images = diffusion.sample(model, len(labels), labels, cfg_scale=3, generator=torch.Generator().manual_seed(0),
                              **SAMPLES)
    predictions, _ = evaluate.classify(shapes_classifier().eval(), images)
    assert (predictions == labels).float().mean() >= 0.8  # (the run's accuracy: about 0.95)


def test_both_shipped_models_denoise_real_shapes():
    """Real shapes noised halfway (t = 500, alpha_hat 0.49): each model's x_0 (the unconditional one; the conditional
    one with no label) is far closer to the real images than the best blind guess, their mean image (measured: mean
    squared errors 0.011 against 0.34; untrained weights: 0.4 to 0.5)."""
    from data import draw_shapes
    from utils import from_images
    x0 = from_images(draw_shapes(60, (32, 32), seed=5).images, (3, 32, 32), "cpu")  # not the training images
    blind = (x0 - x0.mean(0)).square().mean()
    for run in ("shapes_uncond", "shapes"):
        diffusion, model = load_run(REPO / "pretrained" / run, "cpu")
        t = torch.full((len(x0),), 500)
        x_t, _ = diffusion.noise_images(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
        with torch.no_grad():
            output = model(x_t, t) if run == "shapes_uncond" else model(x_t, t, torch.full((len(x0),), -1))
        predicted = diffusion.predicted_x0(output, x_t, diffusion.alpha_hat_list[500]).clamp(-1, 1)
        assert (predicted - x0).square().mean() < 0.1 * blind, run
