"""Denoising diffusion probabilistic models (Ho et al. 2020): unconditional training and sampling.

    python ddpm.py                                   # the built-in "shapes" data, no download
    python ddpm.py --dataset cifar10 --img_size 64   # every UPPERCASE constant below is an option

Below the constants: Diffusion (the forward process, Algorithm 2, DDIM and DPM-Solver++ sampling, classifier-free
guidance, RePaint inpainting and SDEdit img2img), then the training step (Algorithm 1) and the sample grid.
Checkpoints go to models/<RUN_NAME>/, sample grids and the loss curve to results/<RUN_NAME>/; running the same
command again resumes (the loop, checkpoints and torchrun are in training.py).
`torchrun --nproc_per_node=N ddpm.py ...` trains on N processes (GPUs) with DistributedDataParallel.
"""
import math

import torch
from tqdm import tqdm

from modules import UNet
from training import gather, load_run, run_script, share
from utils import UserError, autocast, image_size, pick_device, plot_images

__all__ = ["Diffusion", "UNet", "load_run", "plot_images", "sample_grid", "train_step"]  # from ddpm import *

# --- data ---
RUN_NAME = "DDPM_unconditional"  # files go to models/<RUN_NAME>/ and results/<RUN_NAME>/
DATASET = "shapes"        # "shapes" (built in), "cifar10", "mnist", "fashion_mnist", a FER-2013 .csv, or a folder
DATA_DIR = "data"         # where torchvision datasets are downloaded to / looked for
NUM_IMAGES: int | None = None  # a fixed random subset of this many training images (None: all; "shapes": 10000)
IMG_SIZE = 32             # int, or (height, width); divisible by 8
CHANNELS: int | None = None  # None: the dataset's (1 grayscale, 3 RGB)
FLIP: bool | None = None  # random horizontal flips; None: the dataset's (on, off for mnist, fashion_mnist)
# --- model ---
WIDTH = 16                # channels at full resolution; tutorial: 64
ATTENTION = (8,)          # self-attention at these downsampling factors; tutorial: (1, 2, 4, 8), all six blocks
NORM_GROUPS = 8           # GroupNorm groups in every convolution block (must divide WIDTH); tutorial: 1
RES_BLOCKS = 1            # residual blocks in each Down and Up level before the one that changes the width; tutorial: 1
BOTTLENECK_EMBEDDING = False  # the time embedding enters the bottleneck too (README); tutorial: False
FILM = True               # the time/label embedding as a per-channel scale and shift; tutorial: False (added)
# --- diffusion ---
NOISE_STEPS = 1000        # T
BETA_START, BETA_END = 1e-4, 0.02
SCHEDULE = "cosine"       # "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020, the tutorial's)
PREDICTION = "v"          # what the UNet predicts: "v" (Salimans & Ho 2022), "eps" (the tutorial's) or "x0"
LOSS_WEIGHTING = "min_snr"  # "min_snr" (Hang et al. 2023) or "none" (plain MSE, the tutorial's)
MIN_SNR_GAMMA = 5.0
TIMESTEPS = "logit_normal"  # how training draws t: "logit_normal" (Esser et al. 2024), "importance" (the same
                            # objective, drawn where its loss varies most) or "uniform" (the tutorial's)
# --- training ---
EPOCHS = 24
BATCH_SIZE = 32
GRAD_ACCUM = 1            # micro-batches of BATCH_SIZE per optimizer step (a big model on a small GPU): same result
LR = 2e-3                 # peak learning rate; tutorial: 3e-4
LR_WARMUP = 200           # steps of linear warm-up from 0 to LR; tutorial: 0
LR_SCHEDULE = "cosine"    # then "cosine" or "linear" decay to 0 at the last step, or "constant" (the tutorial's)
OPTIMIZER = "adamw"       # "adamw" (the tutorial's) or "muon" (Muon for the weight matrices, AdamW for the rest)
EMA_BETA = 0.99           # EMA decay, matched to a short run; tutorial: 0.995
EMA_START = 300           # steps during which the EMA model just copies the weights; tutorial: 2000
SAMPLE_STEPS = 20         # sampler steps for the sample grid written after each epoch (20: as good as 50, README)
SAMPLER = "ddim"          # its sampler: "ddim" or "dpm++" (DPM-Solver++(2M)); tutorial: ancestral, 1000 steps
SAVE_EVERY = 0            # also save every N steps within an epoch (0: only at the end of each epoch)
LOG_EVERY = 25            # steps between loss readouts (each one waits for the device)
SEED = 0
# --- machine ---
DEVICE = "auto"           # "auto": CUDA, else Apple MPS, else CPU
AMP: bool | str = True   # mixed precision: bf16 where native, fp16 on older CUDA GPUs, else fp32; or "fp16"/"bf16"
CHANNELS_LAST = False     # channels-last memory format: True for tensor-core GPUs; on CPUs it slows GroupNorm in >1 group
COMPILE = False           # torch.compile the model
NUM_WORKERS = 4           # DataLoader workers for image folders (in-memory datasets need none)


class Diffusion:
    """The forward process q(x_t | x_0) and the samplers. Timestep index t = 0 .. T-1 is the paper's t = 1 .. T."""

    def __init__(self, noise_steps=1000, beta_start=1e-4, beta_end=0.02, img_size=64, device=None, channels=3,
                 schedule="linear", prediction="eps", loss_weighting="none", min_snr_gamma=5.0, timesteps="uniform"):
        self.noise_steps, self.beta_start, self.beta_end, self.schedule = noise_steps, beta_start, beta_end, schedule
        if timesteps not in ("uniform", "logit_normal", "importance"):
            raise UserError(f"timesteps '{timesteps}': expected 'uniform', 'logit_normal' or 'importance'")
        self.timesteps = timesteps
        if prediction not in ("eps", "v", "x0"):
            raise UserError(f"prediction '{prediction}': expected 'eps', 'v' or 'x0'")
        if loss_weighting not in ("none", "min_snr"):
            raise UserError(f"loss_weighting '{loss_weighting}': expected 'none' or 'min_snr'")
        self.prediction, self.loss_weighting, self.min_snr_gamma = prediction, loss_weighting, min_snr_gamma
        self.img_size, self.channels = image_size(img_size), channels
        self.device = pick_device(device)
        beta = self.prepare_noise_schedule().double()
        alpha_hat = torch.cumprod(1 - beta, dim=0)
        self.beta, self.alpha, self.alpha_hat = (v.float().to(self.device) for v in (beta, 1 - beta, alpha_hat))
        self.beta_list, self.alpha_hat_list = beta.tolist(), alpha_hat.tolist()  # float64 scalars for the samplers
        if timesteps == "importance":  # the logit-normal's P(t) (t = floor(T sigmoid(u))), in 20 bins of T / 20 steps
            bins, steps = min(20, noise_steps), torch.arange(noise_steps + 1, dtype=torch.float64)
            p_t = torch.special.ndtr(torch.logit(steps / noise_steps)).diff()
            bin_of_t = torch.arange(noise_steps) * bins // noise_steps
            p_bin = torch.zeros(bins, dtype=torch.float64).index_add(0, bin_of_t, p_t)
            self.p_t, self.p_bin, self.bin_of_t = p_t.float().to(self.device), p_bin.float().to(self.device), \
                bin_of_t.to(self.device)
            # each bin's mean squared loss (over about its last 32 losses, see learn_proposal), and how many it has seen
            self.loss_square, self.loss_count = torch.zeros_like(self.p_bin), torch.zeros_like(self.p_bin)

    def prepare_noise_schedule(self):
        """beta_1 .. beta_T."""
        if self.schedule == "linear":  # Ho et al. 2020, section 4
            return torch.linspace(self.beta_start, self.beta_end, self.noise_steps, dtype=torch.float64)
        if self.schedule == "cosine":  # Nichol & Dhariwal 2021, eq. 17
            s, steps = 0.008, torch.arange(self.noise_steps + 1, dtype=torch.float64) / self.noise_steps
            alpha_hat = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            return (1 - alpha_hat[1:] / alpha_hat[:-1]).clamp(max=0.999)
        raise UserError(f"schedule '{self.schedule}': expected 'linear' or 'cosine'")

    def noise_images(self, x, t, noise=None):
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_hat_t) x_0, (1 - alpha_hat_t) I) (eq. 4); returns (x_t, the noise)."""
        noise = torch.randn_like(x) if noise is None else noise
        alpha_hat = self.alpha_hat[t][:, None, None, None]
        return alpha_hat.sqrt() * x + (1 - alpha_hat).sqrt() * noise, noise

    def training_target(self, x0, noise, t):
        """What the network learns to predict from x_t: the noise eps (Ho et al. 2020), the velocity
        v = sqrt(alpha_hat) eps - sqrt(1 - alpha_hat) x_0 (Salimans & Ho 2022), or x_0 itself."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        alpha_hat = self.alpha_hat[t][:, None, None, None]
        return alpha_hat.sqrt() * noise - (1 - alpha_hat).sqrt() * x0

    def loss_weight(self, t):
        """Per-sample weights of the squared error. "min_snr" (Hang et al. 2023): the x_0 error weighted by
        min(SNR_t, gamma), SNR_t = alpha_hat / (1 - alpha_hat); since the eps error is SNR times the x_0 error and the
        v error (SNR + 1) times, that is min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v."""
        if self.loss_weighting == "none":
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.alpha_hat[t] / (1 - self.alpha_hat[t])
        clipped = snr.clamp(max=self.min_snr_gamma)
        return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[self.prediction]

    def loss(self, predicted, x0, noise, t):
        """Algorithm 1, line 5, for every prediction type, one per sample: loss_weight(t) * || target - predicted ||^2,
        the target being training_target (the tutorial's: || eps - eps_theta(x_t, t) ||^2, weight 1). A step
        minimises the mean of importance_weight(t) times these."""
        squared_error = (predicted.float() - self.training_target(x0, noise, t)).square().mean(dim=(1, 2, 3))
        return self.loss_weight(t) * squared_error

    def predicted_x0(self, output, x, alpha_hat):
        """The x_0 that the network's output implies at noise level alpha_hat (a float), from x = x_t."""
        if self.prediction == "eps":
            return (x - math.sqrt(1 - alpha_hat) * output) / math.sqrt(alpha_hat)
        if self.prediction == "v":
            return math.sqrt(alpha_hat) * x - math.sqrt(1 - alpha_hat) * output
        return output

    def sample_timesteps(self, n, generator=None):
        """t ~ Uniform({1, ..., T}) (Algorithm 1, line 3), as indices 0 .. T-1; or "logit_normal": t / T = sigmoid(u),
        u ~ N(0, 1), which trains the middle noise levels more often (Esser et al. 2024, eq. 19); or "importance": the
        logit-normal's bins drawn at the rates of proposal() (within a bin, t as the logit-normal draws it there)."""
        if self.timesteps == "uniform":
            return torch.randint(0, self.noise_steps, (n,), device=self.device, generator=generator)
        if self.timesteps == "importance":
            q_t = self.p_t * (self.proposal() / self.p_bin)[self.bin_of_t]
            return torch.multinomial(q_t, n, replacement=True, generator=generator)
        u = torch.randn(n, device=self.device, generator=generator)
        return (torch.sigmoid(u) * self.noise_steps).long().clamp(max=self.noise_steps - 1)

    def proposal(self):
        """"importance": how often to draw each bin of t. The logit-normal's bin probabilities p until every bin has
        8 losses, then q = 0.8 p sqrt(E[loss^2]) / Z + 0.2 p (Nichol & Dhariwal 2021, sec. 3.3, with p as the base
        and a fifth of p kept): the rate that minimises the variance of the loss's estimate, so steps go to the bins
        whose losses are large or vary most. With importance_weight = p / q the objective is the logit-normal's."""
        mean_square = self.loss_square / (1 - (31 / 32) ** self.loss_count).clamp(min=1e-12)  # as Adam's bias fix
        q = self.p_bin * mean_square.sqrt()
        q = 0.8 * q / q.sum().clamp(min=1e-30) + 0.2 * self.p_bin
        return torch.where((self.loss_count >= 8).all(), q, self.p_bin)

    def importance_weight(self, t):
        """p(t) / q(t) for timesteps drawn by proposal(), so that E_q[weight * loss] = E_p[loss]; else 1."""
        if self.timesteps != "importance":
            return 1.0
        return (self.p_bin / self.proposal())[self.bin_of_t[t]]

    def learn_proposal(self, t, losses):
        """"importance": each bin's mean squared loss takes in the losses (loss(), unweighted) at timesteps t: a mean
        over all the bin's losses so far, each weighted (31/32)^k, k the number of the bin's losses after it (so about
        its last 32). Called with the whole global batch after its step, so proposal() stays the same within a step.
        A NaN or infinite loss is left out (the run's NaN stop reports it), so the proposal stays a distribution."""
        bins, finite = self.bin_of_t[t], losses.isfinite()
        seen = torch.zeros_like(self.loss_count).index_add_(0, bins, finite.float())
        batch_square = torch.zeros_like(self.loss_square).index_add_(0, bins, losses.float().where(finite, 0).square())
        kept = (31 / 32) ** seen
        self.loss_square = kept * self.loss_square + (1 - kept) * batch_square / seen.clamp(min=1)
        self.loss_count = self.loss_count + seen

    @torch.inference_mode()
    def sample(self, model, n, labels=None, cfg_scale=3, steps=None, generator=None, progress=True, sampler="ddim",
               frames_every=None):
        """n images as uint8 (n, C, H, W): ancestral sampling over all T steps (Algorithm 2), or `steps` steps of
        `sampler`: deterministic DDIM or DPM-Solver++(2M). labels: class indices (n,) or multi-hot vectors
        (n, num_classes), or None for unconditional samples; cfg_scale: classifier-free guidance weight (1: plain
        conditional, 0: unconditional). frames_every=k: returns (images, frames), frames being the predicted x_0 as
        uint8 images every k steps and at the last (the images): a denoising animation (utils.save_frames_gif)."""
        x = torch.randn((n, self.channels, *self.img_size), device=self.device, generator=generator)
        out = self.denoise(model, x, labels, cfg_scale, steps, generator, progress, sampler, frames_every=frames_every)
        return (to_images(out[0]), out[1]) if frames_every else to_images(out)

    @torch.inference_mode()
    def denoise(self, model, x, labels=None, cfg_scale=3, steps=None, generator=None, progress=False, sampler="ddim",
                start=None, frames_every=None):
        """Run the reverse process from x = x_t at timestep index `start` (None: T - 1, pure noise) down to x_0
        (float, about [-1, 1]); with frames_every=k, returns (x_0, frames) as sample does."""
        labels = self.check_labels(model, labels, len(x))
        check_sampler(sampler)
        start = self.noise_steps - 1 if start is None else start
        ancestral = steps is None or steps == self.noise_steps
        timesteps = list(range(start, -1, -1)) if ancestral else self.sampler_timesteps(steps, sampler, start)
        was_training = model.training
        model.eval()
        frames, previous = [], None  # previous: DPM-Solver++'s last (x_0 prediction, lambda)
        for i, step in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
            alpha_hat = self.alpha_hat_list[step]
            alpha_hat_next = self.alpha_hat_list[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            x0 = self.denoised(model, x, step, labels, cfg_scale)
            if frames_every and (i % frames_every == 0 or i == len(timesteps) - 1):
                frames.append(to_images(x0))  # at the last step x_0 is what the step returns
            if ancestral:  # Algorithm 2, line 4, as the posterior mean of eq. 7, with sigma_t^2 = beta_t
                x = self.posterior_mean(x, x0, alpha_hat, alpha_hat_next)
                if step > 0:
                    x = x + math.sqrt(self.beta_list[step]) * torch.randn(x.shape, device=x.device, generator=generator)
            else:
                # DDIM with eta = 0 (Song et al. 2021, eq. 12) is DPM-Solver++'s first-order step (Lu et al. 2022):
                # x' = (sigma' / sigma) x + alpha' (1 - e^-h) D with D = x_0, alpha = sqrt(alpha_hat),
                # sigma = sqrt(1 - alpha_hat), h = lambda' - lambda, lambda = log(alpha / sigma). DPM-Solver++(2M)
                # (their Algorithm 2) takes D = (1 + 1/2r) x_0 - 1/2r x_0_prev, r = h_prev / h, but at the first
                # step (no x_0_prev) and the last one (to x_0 itself: lambda' = infinity, r = 0).
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
        """The x_0 that the guided network predicts from x = x_t at timestep index `step`, clipped to the data range
        as in the paper's released code: from eps it divides by sqrt(alpha_hat) ~ 0.006 at high noise, and a young
        model's small eps errors would throw it far out."""
        t = torch.full((len(x),), step, device=x.device, dtype=torch.long)
        output = self.guided_output(model, x, t, labels, cfg_scale).float()
        return self.predicted_x0(output, x, self.alpha_hat_list[step]).clamp(-1, 1)

    def posterior_mean(self, x, x0, alpha_hat, alpha_hat_next):
        """The mean of q(x_t' | x_t, x_0) (Ho et al. 2020, eq. 7) for a step from x = x_t down to t' < t, with the
        beta of the jump, 1 - alpha_hat_t / alpha_hat_t' (beta_t when t' = t - 1)."""
        beta = 1 - alpha_hat / alpha_hat_next
        return (math.sqrt(alpha_hat_next) * beta * x0
                + math.sqrt(1 - beta) * (1 - alpha_hat_next) * x) / (1 - alpha_hat)

    def logsnr(self, step):
        """lambda_t = log(alpha_t / sigma_t) = log(sqrt(alpha_hat_t / (1 - alpha_hat_t))), the half log-SNR."""
        return 0.5 * math.log(self.alpha_hat_list[step] / (1 - self.alpha_hat_list[step]))

    def sampler_timesteps(self, steps, sampler, start):
        """The `steps` timesteps that `sampler` visits from `start` down to 0."""
        if not 1 <= steps <= start + 1:
            raise UserError(f"steps={steps}: expected 1 .. {start + 1} (or None for all T ancestral steps)")
        return self.ddim_timesteps(steps, start) if sampler == "ddim" else self.dpm_timesteps(steps, start)

    def ddim_timesteps(self, steps, start=None):
        """`steps` distinct timesteps from `start` (None: T-1) down to 0, spaced quadratically: dense at low noise,
        where the first-order DDIM step loses most (Song et al. 2021, appendix D.2, as for their CIFAR-10 model)."""
        start = self.noise_steps - 1 if start is None else start
        t = [int(start * f * f) for f in torch.linspace(1, 0, steps).tolist()]
        for k in range(steps - 2, -1, -1):
            t[k] = max(t[k], t[k + 1] + 1)  # rounding down repeats small timesteps: keep every step distinct
        return t

    def dpm_timesteps(self, steps, start):
        """`steps` distinct timesteps from `start` down to 0, uniform in lambda = log(alpha / sigma), as DPM-Solver
        (Lu et al. 2022) recommends for pixel-space models: the nearest timestep to each point, then moved where
        needed to keep them distinct. The noisy end is clipped at lambda = -5.1 (diffusers' lambda_min_clipped): the
        cosine schedule's last beta of 0.999 puts lambda(T) at -9.9, and uniform steps from there would spend a third
        of them on pure noise. The first step is still at `start`."""
        lam = torch.tensor([self.logsnr(s) for s in range(start + 1)], dtype=torch.float64)
        points = torch.linspace(max(lam[start].item(), -5.1), lam[0].item(), steps, dtype=torch.float64)
        t = (lam[None] - points[:, None]).abs().argmin(1).tolist()
        t[0] = start
        for k in range(steps - 2, -1, -1):
            t[k] = min(max(t[k], t[k + 1] + 1), start - k)  # distinct, leaving room for the k steps before it
        return t

    @torch.inference_mode()
    def img2img(self, model, images, strength, labels=None, cfg_scale=3, steps=50, generator=None, sampler="ddim"):
        """SDEdit (Meng et al. 2022, Algorithm 1): noise uint8 images (n, C, H, W), as sample returns them, to
        t = strength * T, then denoise them from there with `steps` steps of `sampler` (at most one per timestep;
        None: ancestral), guided towards `labels`. strength near 0 keeps the images, 1 starts from pure noise."""
        if not 0 < strength <= 1:
            raise UserError(f"strength={strength}: expected a number in (0, 1]")
        x0 = self.from_images(images)
        start = math.ceil(strength * self.noise_steps) - 1  # the index of t = strength * T, rounded up
        noise = torch.randn(x0.shape, device=self.device, generator=generator)
        x, _ = self.noise_images(x0, torch.full((len(x0),), start, device=self.device), noise)
        steps = None if steps is None else min(steps, start + 1)
        return to_images(self.denoise(model, x, labels, cfg_scale, steps, generator, sampler=sampler, start=start))

    @torch.inference_mode()
    def inpaint(self, model, images, mask, labels=None, cfg_scale=3, steps=50, resample=1, generator=None):
        """RePaint (Lugmayr et al. 2022, Algorithm 1): fill in the pixels of uint8 images (n, C, H, W) where mask is 0,
        keeping those where it is 1 (mask: (n or 1, 1 or C, H, W)). At every step the known pixels are replaced by
        the real image noised to the step's level, so the model fills in the rest around them; `resample` > 1
        repeats each step after noising it one step back (their jump length 1), which harmonises the filled-in
        region with the known one. The steps are DDIM's `steps` timesteps (None: all T), each taken as a stochastic
        posterior step x_t' ~ q(x_t' | x_t, x_0) (DDIM with eta = 1), as RePaint's are for t' = t - 1. Like any
        few-step stochastic sampler, it loses some of the data's variance (on Gaussian data: 10% of the std at 50
        steps, 3% at all 1000)."""
        known = self.from_images(images)
        mask = torch.as_tensor(mask, device=self.device).float()
        if mask.ndim != 4 or any(m not in (1, k) for m, k in zip(mask.shape, known.shape)):
            raise UserError(f"mask of shape {tuple(mask.shape)}: expected one that broadcasts to the images' "
                            f"{tuple(known.shape)}, e.g. (1, 1, H, W)")
        if resample < 1:
            raise UserError(f"resample={resample}: expected 1 or more")
        labels = self.check_labels(model, labels, len(known))
        timesteps = self.sampler_timesteps(steps or self.noise_steps, "ddim", self.noise_steps - 1)
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

    def from_images(self, images):
        """uint8 images (n, C, H, W) of this diffusion's size and channels -> floats in [-1, 1] on its device."""
        shape = (self.channels, *self.img_size)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise UserError(f"images of shape {tuple(images.shape)} and dtype {images.dtype}: expected uint8 "
                            f"(n, {', '.join(map(str, shape))}), as sample returns them")
        return images.to(self.device).float() / 127.5 - 1

    def guided_output(self, model, x, t, labels, cfg_scale):
        """The network's output with classifier-free guidance: out_u + s (out_c - out_u) (Ho & Salimans 2022, eq. 6,
        with s = 1 + w). For eps it is their formula; v and x_0 are affine in eps at fixed x_t, so it is the same."""
        if labels is None:
            return model(x, t)
        if cfg_scale == 1:
            return model(x, t, labels)
        null = torch.zeros_like(labels) if labels.is_floating_point() else torch.full_like(labels, -1)
        if cfg_scale == 0:
            return model(x, t, null)
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)  # one pass
        return eps_u + cfg_scale * (eps_c - eps_u)

    def check_labels(self, model, labels, n):
        if labels is None:
            return None
        labels = torch.as_tensor(labels, device=self.device)
        num_classes = getattr(model, "num_classes", None)
        if labels.is_floating_point():
            if labels.shape != (n, num_classes or labels.shape[-1]):
                raise UserError(f"multi-hot labels of shape {tuple(labels.shape)}: expected ({n}, {num_classes})")
        elif labels.shape != (n,):
            raise UserError(f"labels of shape {tuple(labels.shape)}: expected one class index per image, ({n},)")
        elif num_classes is not None and len(labels) and labels.max() >= num_classes:
            raise UserError(f"label {labels.max().item()} is outside the model's {num_classes} classes "
                            f"(0 .. {num_classes - 1})")
        return labels


def check_sampler(sampler):
    if sampler not in ("ddim", "dpm++"):
        raise UserError(f"sampler '{sampler}': expected 'ddim' or 'dpm++'")


def to_images(x):
    """Floats in [-1, 1] -> uint8 images in [0, 255], rounded."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Training (Algorithm 1) and the sample grid; train() in training.py runs them over the data
# ---------------------------------------------------------------------------------------------------------------

def train_step(model, ema_model, ema, optimizer, diffusion, images, generator, config, amp_dtype, shard=(0, 1),
               scaler=None):
    """One optimizer step of Algorithm 1 on a batch of uint8 images; returns the loss as a tensor (no host sync).
    shard: (rank, world_size) of this process when the global batch is split across processes (torchrun), see
    training.share. scaler: a torch.amp.GradScaler for float16 autocast (a step whose gradients overflow is skipped)."""
    x0 = images.float() / 127.5 - 1  # [0, 255] -> [-1, 1]
    n, device = len(x0), x0.device
    if config.flip:  # random horizontal flips
        flip = share(lambda m: torch.rand(m, device=device, generator=generator), n, shard) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t = share(lambda m: diffusion.sample_timesteps(m, generator), n, shard)  # Algorithm 1, line 3
    noise = share(lambda m: torch.randn((m, *x0.shape[1:]), device=device, generator=generator), n, shard)  # line 4
    x_t, noise = diffusion.noise_images(x0, t, noise)
    if config.channels_last:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    optimizer.zero_grad(set_to_none=True)
    micro, total, losses = n // config.grad_accum, 0.0, []  # GRAD_ACCUM micro-batches: their gradients add up
    for part in (slice(i, i + micro) for i in range(0, n, micro)):
        with autocast(device, amp_dtype):
            predicted = model(x_t[part], t[part])
        losses.append(diffusion.loss(predicted, x0[part], noise[part], t[part]))  # line 5, one per sample
        loss = (diffusion.importance_weight(t[part]) * losses[-1]).mean() / config.grad_accum
        # float16: the loss scaled up so that small gradients do not flush to zero; inf/NaN gradients skip the step
        (loss if scaler is None else scaler.scale(loss)).backward()
        total += loss.detach()
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    ema.step_ema(ema_model, model, config.ema_start)
    if diffusion.timesteps == "importance":  # the next steps' t are drawn by the whole global batch's losses
        diffusion.learn_proposal(gather(t, shard), gather(torch.cat(losses).detach(), shard))
    return total


def sample_grid(diffusion, ema_model, config, amp_dtype, device):
    """The 8 x 8 images written after each epoch, from the same noise every epoch (so the grids show progress)."""
    generator = torch.Generator(device).manual_seed(config.seed)
    with autocast(device, amp_dtype):
        return diffusion.sample(ema_model, 64, steps=config.sample_steps, generator=generator, progress=False,
                                sampler=config.sampler)


if __name__ == "__main__":
    run_script(globals(), train_step, sample_grid, conditional=False)
