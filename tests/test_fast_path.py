"""The fast path (bf16 autocast, channels_last, one batched CFG pass) changes no result beyond bf16 rounding: the same
weights give the same outputs and samples as fp32, and a short training run reaches the same loss. bf16 autocast
runs on every CPU (emulated, slowly, where it is not native), so these run everywhere, on small models."""
import argparse
import copy

import torch

from data import load_dataset
from ddpm import Diffusion, make_diffusion, make_model
from ddpm_conditional import train_step
from modules import EMA, UNet_conditional
from optimizers import make_optimizer

BF16_ROUNDING = 2 ** -8  # relative rounding error of one bfloat16 operation (8 significant bits)


def fast(model):
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_bf16_channels_last_forward_matches_fp32():
    torch.manual_seed(0)
    model = UNet_conditional(3, 3, num_classes=4, width=16).eval()  # attention at every resolution
    x, t, y = torch.randn(8, 3, 16, 16), torch.randint(0, 1000, (8,)), torch.arange(8) % 4
    with torch.no_grad():
        reference = model(x, t, y)
        with bf16():
            output = fast(model)(x.contiguous(memory_format=torch.channels_last), t, y)
    assert output.dtype == torch.bfloat16  # autocast really ran
    relative_error = ((output.float() - reference).norm() / reference.norm()).item()
    assert relative_error < 8 * BF16_ROUNDING  # the rounding of a few dozen layers, not a different function
    assert relative_error > 0.1 * BF16_ROUNDING  # ... and not fp32 by accident


def test_bf16_guided_ddim_samples_match_fp32():
    torch.manual_seed(0)
    model = UNet_conditional(3, 3, num_classes=4, width=16).eval()
    diffusion, labels = Diffusion(img_size=16, device="cpu"), torch.arange(8) % 4
    reference = diffusion.sample(model, 8, labels, cfg_scale=3, steps=10, generator=torch.Generator().manual_seed(1),
                                 progress=False)
    with bf16():
        images = diffusion.sample(fast(model), 8, labels, cfg_scale=3, steps=10,
                                  generator=torch.Generator().manual_seed(1), progress=False)
    difference = (images.int() - reference.int()).abs().float()
    assert difference.mean() < 3  # pixel levels of 255: the same images up to rounding
    assert reference.float().std() > 30  # (and the images are not flat, where any two samplers would agree)


def test_short_bf16_training_reaches_the_fp32_loss():
    """60 steps on the built-in data, same seed and batches, in fp32 and in the fast path; both models are then
    scored in fp32 on the same held-out noisy images. Across training seeds this loss varies by about 2.5%."""
    train_data = load_dataset("shapes", 16, split="train", num_images=512)
    images, labels = load_dataset("shapes", 16, split="test", num_images=64)[torch.arange(64)]
    config = argparse.Namespace(channels=3, num_classes=6, width=8, attention=(8,), img_size=16, schedule="cosine",
                                prediction="v", loss_weighting="min_snr", cfg_drop=0.1, ema_start=0, flip=True,
                                norm_groups=1, film=False, timesteps="uniform", grad_accum=1)

    def held_out_loss(model):
        diffusion, generator = make_diffusion(config, "cpu"), torch.Generator().manual_seed(123)
        x0 = (images.float() / 127.5 - 1).repeat(4, 1, 1, 1)
        t, noise = diffusion.sample_timesteps(len(x0), generator), torch.randn(x0.shape, generator=generator)
        with torch.no_grad():
            error = (model(diffusion.noise_images(x0, t, noise)[0], t, labels.repeat(4)) -
                     diffusion.training_target(x0, noise, t)).square().mean(dim=(1, 2, 3))
        return (diffusion.loss_weight(t) * error).mean().item()

    def train(amp_dtype, channels_last):
        torch.manual_seed(0)
        model = make_model(config)
        initial_loss = held_out_loss(model)
        model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        optimizer = make_optimizer(model, 2e-3, torch.device("cpu"))
        diffusion, generator, order = make_diffusion(config, "cpu"), torch.Generator().manual_seed(0), torch.Generator()
        order.manual_seed(0)
        config.channels_last = channels_last
        ema_model, ema = copy.deepcopy(model), EMA(0.9)
        for _ in range(60):
            batch_images, batch_labels = train_data[torch.randint(0, len(train_data), (32,), generator=order)]
            train_step(model, ema_model, ema, optimizer, diffusion, batch_images, batch_labels, generator, config,
                       amp_dtype)
        return initial_loss, held_out_loss(model.float())

    initial_loss, fp32_loss = train(None, channels_last=False)
    _, fast_loss = train(torch.bfloat16, channels_last=True)
    assert fp32_loss < 0.5 * initial_loss  # it learned something
    assert fast_loss < fp32_loss * 1.02  # no worse than fp32, within the seed-to-seed noise
