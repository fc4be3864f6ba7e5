"""Denoising diffusion probabilistic models (Ho et al. 2020): unconditional training and sampling.

    python ddpm.py                                   # the built-in "shapes" data, no download
    python ddpm.py config/tutorial.py                # the tutorial's setting (config/: presets): models/tutorial_uncond
    python ddpm.py --dataset cifar10 --img_size 64   # every UPPERCASE constant below is an option (--help)
    torchrun --nproc_per_node=N ddpm.py              # N processes (GPUs), DistributedDataParallel

Below the constants: Diffusion (the forward process, Algorithm 2, DDIM and DPM-Solver++, classifier-free guidance,
RePaint inpainting, SDEdit img2img), train_step (Algorithm 1), train(), load_run. Checkpoints go to models/<RUN_NAME>/,
grids and the loss curve to results/<RUN_NAME>/; Ctrl-C saves and stops; the same command resumes.
"""
import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoints import load_weights, read_config, read_train_state, resume, save_train_state
from data import UserError, complete_config, get_data, image_size, load_dataset
from importance import ImportanceSampler
from modules import EMA, UNet, UNet_conditional
from optimizers import make_optimizer
from options import check_config, clear_errors, parse_config
from utils import (all_gather, amp_dtype, autocast, check_attention_memory, check_cfg_scale, check_labels,
                   distributed, from_images, grad_scaler, learning_rate, local_rank_zero_first, make_logger,
                   mean_loss, no_sync, pick_device, plot_images, save_and_stop_on_ctrl_c, save_images, save_loss_plot,
                   save_progress_gif, setup_logging, time_left, to_images)

__all__ = ["Diffusion", "UNet", "load_run", "plot_images", "save_images"]  # from ddpm import *

# --- the tutorial's knobs ---
RUN_NAME = "DDPM_unconditional"  # files go to models/<RUN_NAME>/ and results/<RUN_NAME>/
DATASET = "shapes"        # "shapes" (built in, no download), "cifar10", "mnist", "fashion_mnist", a folder of class
                          # subfolders, or a FER-2013 .csv
IMG_SIZE = 32             # an int, or (height, width); divisible by 8; tutorial: 64
WIDTH = 16                # channels at full resolution; tutorial: 64
ATTENTION = (8,)          # self-attention at these downsampling factors, among 1, 2, 4, 8; tutorial: all four
EPOCHS = 24               # tutorial: 500
BATCH_SIZE = 32           # images a step; tutorial: 12
LR = 2e-3                 # peak learning rate; tutorial: 3e-4
EMA_BETA = 0.99           # EMA decay (the tutorial's conditional script keeps one: 0.995)
EMA_START = 300           # steps during which the EMA model just copies the weights; tutorial: 2000
# --- beyond the tutorial: the measured recipe (docs/measurements.md) ---
NORM_GROUPS = 8           # GroupNorm groups in every convolution block (must divide WIDTH); tutorial: 1
FILM = True               # the time embedding as a per-channel scale and shift; tutorial: False (added)
SCHEDULE = "cosine"       # "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020; tutorial)
PREDICTION = "v"          # what the UNet predicts: "v" (Salimans & Ho 2022) or "eps" (tutorial)
LOSS_WEIGHTING = "min_snr"  # "min_snr" (Hang et al. 2023, gamma 5) or "none" (plain MSE; tutorial)
TIMESTEPS = "logit_normal"  # how training draws t: "logit_normal" (Esser et al. 2024), "importance" (its objective,
                            # drawn where its loss varies most) or "uniform" (tutorial)
LR_WARMUP = 200           # steps of linear warm-up from 0 to LR; tutorial: 0
LR_SCHEDULE = "cosine"    # then "cosine" decay to 0 at the last step, or "constant" (tutorial)
OPTIMIZER = "adamw"       # "adamw" (tutorial) or "muon" (Muon for the weight matrices, AdamW for the rest)
SAMPLER = "ddim"          # the sample grid's sampler: "ddim", "dpm++" (DPM-Solver++(2M)) or "ancestral" (tutorial)
SAMPLE_STEPS = 20         # its steps (20: as good as 50; "ancestral" takes all 1000)
# --- data and machine ---
# (and --data_dir, --save_every, --compile: every script's, command-line only, in options.py)
NUM_IMAGES: int | None = None  # a fixed random subset of this many training images (None: all; "shapes": 10000)
FLIP: bool | None = None  # random horizontal flips; None: the dataset's (off for mnist and fashion_mnist)
GRAD_ACCUM = 1            # micro-batches of BATCH_SIZE per optimizer step (a big model on a small GPU): same result
SEED = 0
DEVICE = "auto"           # "auto": CUDA, else Apple MPS, else CPU; or "cpu", "cuda", "cuda:1", "mps"
AMP: bool | str = True    # mixed precision: bf16 where native, fp16 on older CUDA GPUs, else fp32; or "bf16", "fp16"
LOGGER: str | None = None  # the loss, LR and sample grids also to "tensorboard" (runs/<RUN_NAME>/, as the tutorial)
                           # or "wandb" (offline: WANDB_MODE=offline); each needs its package


class Diffusion:
    """Forward process q(x_t | x_0), training loss, samplers. Index t = 0 .. T-1 is the paper's t = 1 .. T."""

    def __init__(self, noise_steps=1000, beta_start=1e-4, beta_end=0.02, img_size=64, device=None, channels=3,
                 schedule="linear", prediction="eps", loss_weighting="none", timesteps="uniform"):
        for name, value, allowed in (("schedule", schedule, ("linear", "cosine")), ("prediction", prediction,
                                     ("eps", "v")), ("loss_weighting", loss_weighting, ("none", "min_snr")),
                                     ("timesteps", timesteps, ("uniform", "logit_normal"))):
            if value not in allowed:
                raise UserError(f"{name} '{value}': expected {' or '.join(map(repr, allowed))}")
        self.noise_steps, self.beta_start, self.beta_end, self.schedule = noise_steps, beta_start, beta_end, schedule
        self.prediction, self.loss_weighting, self.timesteps = prediction, loss_weighting, timesteps
        self.img_size, self.channels = image_size(img_size), channels
        self.device = pick_device(device)
        beta = self.prepare_noise_schedule()
        alpha_hat = torch.cumprod(1 - beta, dim=0)
        self.beta, self.alpha, self.alpha_hat = (v.float().to(self.device) for v in (beta, 1 - beta, alpha_hat))
        self.alpha_hat_list, self.beta_list = alpha_hat.tolist(), beta.tolist()  # float64 scalars for the samplers

    def prepare_noise_schedule(self):
        """beta_1 .. beta_T, in float64."""
        if self.schedule == "linear":  # Ho et al. 2020, section 4
            return torch.linspace(self.beta_start, self.beta_end, self.noise_steps, dtype=torch.float64)
        s, steps = 0.008, torch.arange(self.noise_steps + 1, dtype=torch.float64) / self.noise_steps
        alpha_hat = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2  # Nichol & Dhariwal 2021, eq. 17
        return (1 - alpha_hat[1:] / alpha_hat[:-1]).clamp(max=0.999)

    def noise_images(self, x, t, noise=None):
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_hat_t) x_0, (1 - alpha_hat_t) I) (eq. 4); returns (x_t, the noise)."""
        noise = torch.randn_like(x) if noise is None else noise
        alpha_hat = self.alpha_hat[t][:, None, None, None]
        return alpha_hat.sqrt() * x + (1 - alpha_hat).sqrt() * noise, noise

    def sample_timesteps(self, n, generator=None):
        """t ~ Uniform({1, ..., T}) (Algorithm 1, line 3); or "logit_normal": t / T = sigmoid(u), u ~ N(0, 1), which
        trains the middle noise levels more often (Esser et al. 2024, eq. 19)."""
        if self.timesteps == "uniform":
            return torch.randint(0, self.noise_steps, (n,), device=self.device, generator=generator)
        u = torch.randn(n, device=self.device, generator=generator)
        return (torch.sigmoid(u) * self.noise_steps).long().clamp(max=self.noise_steps - 1)

    def training_target(self, x0, noise, t):
        """Target: eps (Ho et al. 2020) or v = sqrt(alpha_hat) eps - sqrt(1 - alpha_hat) x_0 (Salimans & Ho 2022)."""
        if self.prediction == "eps":
            return noise
        alpha_hat = self.alpha_hat[t][:, None, None, None]
        return alpha_hat.sqrt() * noise - (1 - alpha_hat).sqrt() * x0

    def loss_weight(self, t):
        """"min_snr" (Hang et al. 2023): the x_0 error weighted by min(SNR_t, 5), SNR_t = alpha_hat / (1 - alpha_hat)
        (gamma 5: 2 and 20 lose, docs/measurements.md); the eps error is SNR times the x_0 error and the v error
        (SNR + 1) times, hence the divisions."""
        if self.loss_weighting == "none":
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.alpha_hat[t] / (1 - self.alpha_hat[t])
        clipped = snr.clamp(max=5.0)
        return clipped / snr if self.prediction == "eps" else clipped / (snr + 1)

    def loss(self, predicted, x0, noise, t):
        """Algorithm 1, line 5, per sample: loss_weight(t) * || target - predicted ||^2 (tutorial: eps, weight 1)."""
        squared_error = (predicted.float() - self.training_target(x0, noise, t)).square().mean(dim=(1, 2, 3))
        return self.loss_weight(t) * squared_error

    @torch.inference_mode()
    def sample(self, model, n, labels=None, cfg_scale=3, steps=None, generator=None, progress=True, sampler=None,
               frames_every=None):
        """n uint8 images (n, C, H, W) from pure noise: sampler "ancestral" (Algorithm 2, all T steps), or `steps`
        steps of deterministic "ddim" or "dpm++" (DPM-Solver++(2M)); None: ancestral if steps is None, else DDIM.
        labels: class indices (n,) (-1: none), multi-hot (n, classes) or None; cfg_scale: see guided_output.
        frames_every=k: also the predicted x_0 every k steps."""
        x = torch.randn((n, self.channels, *self.img_size), device=self.device, generator=generator)
        out = self.denoise(model, x, labels, cfg_scale, steps, generator, progress, sampler, frames_every=frames_every)
        return (to_images(out[0]), out[1]) if frames_every else to_images(out)

    @torch.inference_mode()
    def denoise(self, model, x, labels=None, cfg_scale=3, steps=None, generator=None, progress=False, sampler=None,
                start=None, frames_every=None):
        """The reverse process, as sample's, from x = x_t at timestep index `start` (None: T - 1) to x_0 (floats)."""
        labels, model = check_labels(model, labels, len(x), self.device), model.to(self.device)  # (one device)
        check_cfg_scale(cfg_scale)
        start = self.noise_steps - 1 if start is None else start
        sampler = sampler or ("ancestral" if steps is None else "ddim")
        timesteps = self.sampler_timesteps(steps, sampler, start)
        was_training = model.training
        model.eval()
        frames, previous = [], None  # previous: DPM-Solver++'s last (x_0 prediction, lambda)
        for i, step in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
            alpha_hat = self.alpha_hat_list[step]
            alpha_hat_next = self.alpha_hat_list[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            x0 = self.denoised(model, x, step, labels, cfg_scale)
            if frames_every and (i % frames_every == 0 or i == len(timesteps) - 1):
                frames.append(to_images(x0))  # at the last step x_0 is what the step returns
            if sampler == "ancestral":  # Algorithm 2, line 4, as the posterior mean of eq. 7, with sigma_t^2 = beta_t
                x = self.posterior_mean(x, x0, alpha_hat, alpha_hat_next)
                if step > 0:
                    x = x + math.sqrt(self.beta_list[step]) * torch.randn(x.shape, device=x.device, generator=generator)
                continue
            # DDIM, eta = 0 (Song et al. 2021, eq. 12), is DPM-Solver++'s first-order step (Lu et al. 2022):
            # x' = (sigma' / sigma) x + alpha' (1 - e^-h) D, D = x_0; alpha, sigma = sqrt(alpha_hat, 1 - alpha_hat),
            # h = lambda' - lambda. DPM-Solver++(2M) (their Algorithm 2): D = (1 + 1/2r) x_0 - 1/2r x_0_prev,
            # r = h_prev / h, but at the first step (no x_0_prev) and the last (to x_0: lambda' = infinity).
            sigma_ratio = math.sqrt((1 - alpha_hat_next) / (1 - alpha_hat))
            D = x0
            if sampler == "dpm++" and previous is not None and alpha_hat_next < 1:
                r = (self.logsnr(step) - previous[1]) / (self.logsnr(timesteps[i + 1]) - self.logsnr(step))
                D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous[0]
            x = sigma_ratio * x + (math.sqrt(alpha_hat_next) - math.sqrt(alpha_hat) * sigma_ratio) * D
            previous = x0, self.logsnr(step)
        model.train(was_training)
        return (x, frames) if frames_every else x

    def denoised(self, model, x, step, labels, cfg_scale):
        """The x_0 the guided network predicts from x = x_t, clipped to the data range as in the paper's code (from eps
        it divides by sqrt(alpha_hat) ~ 0.006 at high noise)."""
        t = torch.full((len(x),), step, device=x.device, dtype=torch.long)
        output = self.guided_output(model, x, t, labels, cfg_scale).float()
        return self.predicted_x0(output, x, self.alpha_hat_list[step]).clamp(-1, 1)

    def predicted_x0(self, output, x, alpha_hat):
        """The x_0 that the network's output implies at noise level alpha_hat (a float), from x = x_t."""
        if self.prediction == "eps":
            return (x - math.sqrt(1 - alpha_hat) * output) / math.sqrt(alpha_hat)
        return math.sqrt(alpha_hat) * x - math.sqrt(1 - alpha_hat) * output

    def guided_output(self, model, x, t, labels, cfg_scale):
        """Classifier-free guidance: out_u + s (out_c - out_u) (Ho & Salimans 2022, eq. 6, s = 1 + w; for v too: affine
        in eps at fixed x_t). s = 0 or 1: the conditional model (the tutorial guides only when s > 0)."""
        if labels is None:
            return model(x, t)
        if cfg_scale in (0, 1):
            return model(x, t, labels)
        null = torch.zeros_like(labels) if labels.is_floating_point() else torch.full_like(labels, -1)
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)  # one pass
        return eps_u + cfg_scale * (eps_c - eps_u)

    def posterior_mean(self, x, x0, alpha_hat, alpha_hat_next):
        """Mean of q(x_t' | x_t, x_0) (eq. 7) from x = x_t to t' < t, with beta = 1 - alpha_hat_t / alpha_hat_t'."""
        beta = 1 - alpha_hat / alpha_hat_next
        return (math.sqrt(alpha_hat_next) * beta * x0
                + math.sqrt(1 - beta) * (1 - alpha_hat_next) * x) / (1 - alpha_hat)

    def logsnr(self, step):
        """lambda_t = log(alpha_t / sigma_t), half the log-SNR."""
        return 0.5 * math.log(self.alpha_hat_list[step] / (1 - self.alpha_hat_list[step]))

    def sampler_timesteps(self, steps, sampler, start):
        """The timesteps from `start` down to 0: all for "ancestral"; `steps` (None: all) for DDIM, spaced
        quadratically, dense at low noise where its first-order step loses most (Song et al. 2021, app. D.2); for
        DPM-Solver++ uniform in lambda (Lu et al. 2022) from lambda = -5.1 (diffusers' lambda_min_clipped: the cosine
        schedule's lambda(T) = -9.9 would spend a third of the steps on pure noise)."""
        if sampler not in ("ancestral", "ddim", "dpm++"):
            raise UserError(f"sampler '{sampler}': expected 'ancestral', 'ddim' or 'dpm++'")
        if sampler == "ancestral" and steps not in (None, start + 1):
            raise UserError(f"steps={steps}: the ancestral sampler takes every step ({start + 1}); for fewer, "
                            f"sampler='ddim' or 'dpm++'")
        steps = start + 1 if steps is None else steps
        if not 1 <= steps <= start + 1:
            raise UserError(f"steps={steps}: expected 1 .. {start + 1}")
        if sampler == "ddim":
            t = [int(start * f * f) for f in torch.linspace(1, 0, steps).tolist()]
        elif sampler == "dpm++":
            lam = torch.tensor([self.logsnr(s) for s in range(start + 1)], dtype=torch.float64)
            points = torch.linspace(max(lam[start].item(), -5.1), lam[0].item(), steps, dtype=torch.float64)
            t = (lam[None] - points[:, None]).abs().argmin(1).tolist()
            t[0] = start
        else:
            return list(range(start, -1, -1))
        for k in range(steps - 2, -1, -1):  # rounding repeats timesteps: keep every step distinct, room before it
            t[k] = min(max(t[k], t[k + 1] + 1), start - k)
        return t

    @torch.inference_mode()
    def img2img(self, model, images, strength, labels=None, cfg_scale=3, steps=50, generator=None, sampler=None):
        """SDEdit (Meng et al. 2022, Algorithm 1): noise uint8 images (n, C, H, W) to t = strength * T, then denoise
        them with `steps` steps of `sampler`, guided towards `labels`. Strength 0 returns them, 1 samples afresh."""
        if not 0 <= strength <= 1:
            raise UserError(f"strength={strength}: expected a number in [0, 1]")
        x0 = from_images(images, (self.channels, *self.img_size), self.device)
        if strength == 0:
            return images.to(self.device).clone()
        start = math.ceil(strength * self.noise_steps) - 1  # the index of t = strength * T, rounded up
        noise = torch.randn(x0.shape, device=self.device, generator=generator)
        x, _ = self.noise_images(x0, torch.full((len(x0),), start, device=self.device), noise)
        steps = None if steps is None else min(steps, start + 1)
        return to_images(self.denoise(model, x, labels, cfg_scale, steps, generator, sampler=sampler, start=start))

    @torch.inference_mode()
    def inpaint(self, model, images, mask, labels=None, cfg_scale=3, steps=50, resample=1, generator=None):
        """RePaint (Lugmayr et al. 2022, Algorithm 1): fill in uint8 images (n, C, H, W) where mask (n or 1, 1 or C,
        H, W) is 0, keep them where it is 1: DDIM's `steps` timesteps (None: all T) as stochastic posterior steps,
        known pixels noised to each step's level; `resample` > 1 redoes each step after noising it one step back,
        harmonising the two regions."""
        known = from_images(images, (self.channels, *self.img_size), self.device)
        mask = torch.as_tensor(mask).float().to(self.device)  # (a float64 numpy mask: MPS has no float64)
        if mask.ndim != 4 or any(m not in (1, k) for m, k in zip(mask.shape, known.shape)):
            raise UserError(f"mask of shape {tuple(mask.shape)}: expected one that broadcasts to the images' "
                            f"{tuple(known.shape)}, e.g. (1, 1, H, W)")
        if resample < 1:
            raise UserError(f"resample={resample}: expected 1 or more")
        labels, model = check_labels(model, labels, len(known), self.device), model.to(self.device)
        check_cfg_scale(cfg_scale)
        timesteps = self.sampler_timesteps(steps, "ddim", self.noise_steps - 1)
        randn = lambda: torch.randn(known.shape, device=self.device, generator=generator)
        was_training = model.training
        model.eval()
        x = randn()
        for i, step in enumerate(timesteps):
            alpha_hat = self.alpha_hat_list[step]
            alpha_hat_next = self.alpha_hat_list[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            for u in range(resample if alpha_hat_next < 1 else 1):
                if u > 0:  # back to t: x_t ~ q(x_t | x_t') = N(sqrt(alpha_hat_t / alpha_hat_t') x_t', 1 - that)
                    x = math.sqrt(alpha_hat / alpha_hat_next) * x + math.sqrt(1 - alpha_hat / alpha_hat_next) * randn()
                x0 = self.denoised(model, x, step, labels, cfg_scale)
                variance = (1 - alpha_hat_next) / (1 - alpha_hat) * (1 - alpha_hat / alpha_hat_next)  # beta tilde
                unknown = self.posterior_mean(x, x0, alpha_hat, alpha_hat_next) + math.sqrt(variance) * randn()
                known_t = math.sqrt(alpha_hat_next) * known + math.sqrt(1 - alpha_hat_next) * randn()  # at t'
                x = mask * known_t + (1 - mask) * unknown
        model.train(was_training)
        return to_images(x)


# --- training: Algorithm 1 a step at a time, the sample grid, and the loop ---

def train_step(model, ema_model, ema, optimizer, diffusion, images, generator, c, amp=None, scaler=None,
               importance=None, rank=0, world_size=1):
    """One optimizer step of Algorithm 1 on uint8 images, then the EMA update; returns the loss as a tensor (no wait
    for the device). scaler: float16's GradScaler. Under torchrun every process draws the random numbers of the whole
    global batch and keeps its slice, so N processes compute what one does with the global batch."""
    x0 = images.float() / 127.5 - 1  # [0, 255] -> [-1, 1]
    n, N, device = len(x0), len(x0) * world_size, x0.device
    mine = slice(rank * n, (rank + 1) * n)  # this process's slice of the global batch
    if c.flip:  # random horizontal flips
        flip = torch.rand(N, device=device, generator=generator)[mine] < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t = (importance or diffusion).sample_timesteps(N, generator)[mine]  # Algorithm 1, line 3
    noise = torch.randn((N, *x0.shape[1:]), device=device, generator=generator)[mine]  # line 4: eps ~ N(0, I)
    x_t, noise = diffusion.noise_images(x0, t, noise)
    optimizer.zero_grad(set_to_none=True)
    micro, total, losses = n // c.grad_accum, 0.0, []  # GRAD_ACCUM micro-batches: their gradients add up
    for i in range(0, n, micro):
        part = slice(i, i + micro)
        with no_sync(model, last_micro_batch=i + micro >= n), autocast(device, amp):  # torchrun: one all-reduce
            predicted = model(x_t[part], t[part])
        losses.append(diffusion.loss(predicted, x0[part], noise[part], t[part]))  # line 5, one per sample
        weight = 1.0 if importance is None else importance.weight(t[part])
        loss = (weight * losses[-1]).mean() / c.grad_accum
        (loss if scaler is None else scaler.scale(loss)).backward()  # float16: scaled, so small gradients survive
        total += loss.detach()
    if scaler is None:
        optimizer.step()  # line 6: a gradient step
    else:
        scaler.step(optimizer)
        scaler.update()
    ema.step_ema(ema_model, model, c.ema_start)
    if importance is not None:  # the next steps' t are drawn by the whole global batch's losses
        importance.update(all_gather(t, world_size), all_gather(torch.cat(losses).detach(), world_size))
    return total


def sample_grid(diffusion, ema_model, c, amp, device):
    """The 8 x 8 images written after each epoch, from the same noise every epoch (so the grids show progress)."""
    generator = torch.Generator(device).manual_seed(c.seed)
    with autocast(device, amp):
        return diffusion.sample(ema_model, 64, steps=None if c.sampler == "ancestral" else c.sample_steps,
                                generator=generator, progress=False, sampler=c.sampler)


def train(config):
    """Train a UNet on the data of `config` (the constants above, lower-case), a sample grid after each epoch;
    resumes the run in models/<run_name>/ where one is. Returns (model, ema_model)."""
    c = argparse.Namespace(**vars(config))  # completed below from the data; the caller's stays as it was
    check_config(c)
    with distributed(c.device) as (device, rank, world_size):  # torchrun: one process per GPU
        log = print if rank == 0 else lambda *args: None
        with local_rank_zero_first():  # torchrun: one process downloads, then the others read
            dataset = load_dataset(c.dataset, c.img_size, None, "train", c.data_dir, c.num_images, c.seed)
        complete_config(c, dataset, conditional=False)
        c.world_size = world_size  # the global batch is world_size * batch_size * grad_accum images
        models_dir, results_dir = setup_logging(c.run_name)
        state = read_train_state(models_dir, vars(c))  # None for a new run

        torch.manual_seed(c.seed)
        model = make_model(c).to(device)
        ema_model = copy.deepcopy(model).requires_grad_(False)
        ema = EMA(c.ema_beta)
        optimizer = make_optimizer(model, c.lr, device, c.optimizer)
        diffusion = make_diffusion(c, device)
        importance = ImportanceSampler(diffusion.noise_steps, device) if c.timesteps == "importance" else None
        amp = amp_dtype(device, c.amp)
        scaler = grad_scaler(device, amp)  # float16 needs a loss scale
        check_attention_memory(device, c)  # (Apple MPS)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on CUDA in TF32, as convolutions already are
        generator = torch.Generator(device).manual_seed(c.seed)  # every random draw of training comes from it
        run = dict(model=model, ema_model=ema_model, optimizer=optimizer, ema=ema, scaler=scaler,
                   generator=generator, importance=importance)
        # where the run stands; total and count: the losses since the last readout, summed on the device
        epoch, batch, step, losses, total, count = resume(state, run, log, c.epochs) if state else (0, 0, 0, [], 0.0, 0)
        if epoch >= c.epochs:  # a finished run: nothing to do (resume said so)
            return model, ema_model

        torchrun = torch.distributed.is_initialized()
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
            if torchrun else model  # DDP averages the gradients
        train_model = torch.compile(train_model) if c.compile else train_model
        batch_size = c.batch_size * c.grad_accum  # images per optimizer step and process
        dataloader = get_data(dataset, batch_size, c.seed, device, rank, world_size)
        log(f"{len(dataset)} images, {len(dataloader)} steps per epoch, {sum(p.numel() for p in model.parameters()):,}"
            f" parameters, on {device}{f' with {str(amp)[6:]} autocast' if amp else ''}" + (
                f", torchrun: {world_size} processes ({torch.distributed.get_backend()}), global batch "
                f"{world_size * batch_size}" if torchrun else ""))
        logger = make_logger(c.logger if rank == 0 else None, c.run_name, vars(c))  # (other ranks: nowhere)
        with save_and_stop_on_ctrl_c(models_dir, enabled=not torchrun) as interrupted:
            started, first_step = time.perf_counter(), step  # the pace so far: the time left
            for epoch in range(epoch, c.epochs):
                dataloader.sampler.set_epoch(epoch, start=batch)
                pbar = tqdm(dataloader, desc=f"epoch {epoch + 1}/{c.epochs}", initial=batch, disable=rank != 0)
                for images, _ in pbar:
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(c, step, len(dataloader))
                    images = images.to(device, non_blocking=True)  # (from pinned memory: an asynchronous copy)
                    total += train_step(train_model, ema_model, ema, optimizer, diffusion, images, generator, c, amp,
                                        scaler, importance, rank, world_size)
                    step, batch, count = step + 1, batch + 1, count + 1
                    stop = interrupted()  # Ctrl-C: a checkpoint at this step boundary, then stop
                    save_now = c.save_every and step % c.save_every == 0 and batch < len(dataloader)
                    if step % 25 == 0 or batch == len(dataloader) or save_now:  # a readout waits for the device
                        losses.append((step, mean_loss(total, count, world_size, step, models_dir)))  # NaN: stop
                        pbar.set_postfix(loss=f"{losses[-1][1]:.4f}", run_left=time_left(
                            started, step - first_step, c.epochs * len(dataloader) - step))
                        logger(step, {"loss": losses[-1][1], "lr": optimizer.param_groups[0]["lr"]})
                        total, count = 0.0, 0
                    if stop and count:
                        mean_loss(total, count, world_size, step, models_dir)  # NaN: no save, stop
                    if (save_now or stop) and rank == 0:
                        save_train_state(models_dir, c, run, epoch, batch, step, losses, (total, count))
                    if stop:
                        sys.exit(f"stopped after step {step}, saved in {models_dir}: run the same command to resume")
                pbar.close()
                batch = 0
                if rank == 0:
                    save_train_state(models_dir, c, run, epoch + 1, 0, step, losses)
                    grid = sample_grid(diffusion, ema_model, c, amp, device)
                    save_images(grid, results_dir / f"{epoch + 1}.jpg")
                    logger(step, {}, images=grid)  # TensorBoard's Images tab, or W&B
                    save_progress_gif(results_dir, epoch + 1)
                    save_loss_plot(losses, results_dir / "loss.png")
        log(f"done: {models_dir}/ema_ckpt.pt, sample grids in {results_dir}/")
        return model, ema_model


# --- a run's model and diffusion from its settings; loading a trained run ---

def make_model(c):
    """The UNet a run's settings describe (conditional when c.num_classes is set); a setting it refuses is one line."""
    shape = dict(width=c.width, attention=c.attention, norm_groups=c.norm_groups, film=c.film)
    try:
        if c.num_classes:
            return UNet_conditional(c.channels, c.channels, num_classes=c.num_classes, **shape)
        return UNet(c.channels, c.channels, **shape)
    except ValueError as e:  # the constructor's check, naming the option
        raise UserError(str(e)) from None


def make_diffusion(c, device):
    """The Diffusion a run's settings describe ("importance" draws from the logit-normal's objective)."""
    return Diffusion(img_size=c.img_size, device=device, channels=c.channels, schedule=c.schedule,
                     prediction=c.prediction, loss_weighting=c.loss_weighting,
                     timesteps="logit_normal" if c.timesteps == "importance" else c.timesteps)


def load_run(run, device=None):
    """(diffusion, model) of a trained run, ready to sample: `run` is its folder (models/<run_name>: the EMA weights)
    or one of its checkpoint files; the model predicts, and the diffusion samples, with the run's own settings."""
    config = read_config(run)
    weights = Path(run) / "ema_ckpt.pt" if Path(run).is_dir() else Path(run)
    diffusion = make_diffusion(config, pick_device(device))
    model = load_weights(make_model(config), weights).to(diffusion.device).eval()
    return diffusion, model


if __name__ == "__main__":
    with clear_errors():  # bad input: one line, no traceback
        train(parse_config(globals(), ignore=("NUM_CLASSES", "ATTRIBUTES", "CFG_DROP", "CFG_SCALE"),
                           preset_run_suffix="_uncond"))  # config/fashion_mnist.py: models/fashion_uncond
