"""Denoising diffusion probabilistic models (Ho et al. 2020): unconditional training and sampling.

    python ddpm.py                                   # the built-in "shapes" data, no download
    python ddpm.py --dataset cifar10 --img_size 64   # every UPPERCASE constant below is an option

Checkpoints go to models/<RUN_NAME>/, sample grids and the loss curve to results/<RUN_NAME>/. Running the same
command again resumes where it stopped. ddpm_conditional.py trains with class labels through this same loop.
`torchrun --nproc_per_node=N ddpm.py ...` trains on N processes (GPUs) with DistributedDataParallel.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from modules import EMA, UNet, UNet_conditional
from utils import (UserError, amp_dtype, autocast, default_flip, get_data, image_size, load_dataset, load_weights,
                   parse_config, pick_device, read_checkpoint, replace_atomically, save_checkpoint, save_images,
                   save_loss_plot, setup_logging)

# --- data ---
RUN_NAME = "DDPM_unconditional"  # files go to models/<RUN_NAME>/ and results/<RUN_NAME>/
DATASET = "shapes"        # "shapes" (built in), "cifar10", "mnist", "fashion_mnist", a FER-2013 .csv, or a folder
DATA_DIR = "data"         # where torchvision datasets are downloaded to / looked for
NUM_IMAGES: int | None = None  # a fixed random subset of this many training images (None: all; "shapes": 10000)
IMG_SIZE = 32             # int, or (height, width); divisible by 8
CHANNELS: int | None = None  # None: the dataset's (1 grayscale, 3 RGB)
FLIP: bool | None = None  # random horizontal flips; None: the dataset's (on, but off for mnist)
# --- model ---
WIDTH = 16                # channels at full resolution; tutorial: 64
ATTENTION = (8,)          # self-attention at these downsampling factors; tutorial: (1, 2, 4, 8), all six blocks
# --- diffusion ---
NOISE_STEPS = 1000        # T
BETA_START, BETA_END = 1e-4, 0.02
SCHEDULE = "cosine"       # "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020, the tutorial's)
PREDICTION = "v"          # what the UNet predicts: "v" (Salimans & Ho 2022), "eps" (the tutorial's) or "x0"
LOSS_WEIGHTING = "min_snr"  # "min_snr" (Hang et al. 2023) or "none" (plain MSE, the tutorial's)
MIN_SNR_GAMMA = 5.0
# --- training ---
EPOCHS = 24
BATCH_SIZE = 32
LR = 2e-3                 # tutorial: 3e-4
EMA_BETA = 0.995
EMA_START = 1000          # steps during which the EMA model just copies the weights; tutorial: 2000
SAMPLE_STEPS = 50         # DDIM steps for the sample grid written after each epoch
SAVE_EVERY = 0            # also save every N steps within an epoch (0: only at the end of each epoch)
LOG_EVERY = 25            # steps between loss readouts (each one waits for the device)
SEED = 0
# --- machine ---
DEVICE = "auto"           # "auto": CUDA, else Apple MPS, else CPU
AMP: bool | str = True   # mixed precision: bf16 where native, fp16 on older CUDA GPUs, else fp32; or "fp16"/"bf16"
CHANNELS_LAST = True      # channels-last memory format: faster convolutions on CPUs and tensor-core GPUs
COMPILE = False           # torch.compile the model
NUM_WORKERS = 4           # DataLoader workers for image folders (in-memory datasets need none)


class Diffusion:
    """The forward process q(x_t | x_0) and the samplers. Timestep index t = 0 .. T-1 is the paper's t = 1 .. T."""

    def __init__(self, noise_steps=1000, beta_start=1e-4, beta_end=0.02, img_size=64, device=None, channels=3,
                 schedule="linear", prediction="eps", loss_weighting="none", min_snr_gamma=5.0):
        self.noise_steps, self.beta_start, self.beta_end, self.schedule = noise_steps, beta_start, beta_end, schedule
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

    def predicted_x0(self, output, x, alpha_hat):
        """The x_0 that the network's output implies at noise level alpha_hat (a float), from x = x_t."""
        if self.prediction == "eps":
            return (x - math.sqrt(1 - alpha_hat) * output) / math.sqrt(alpha_hat)
        if self.prediction == "v":
            return math.sqrt(alpha_hat) * x - math.sqrt(1 - alpha_hat) * output
        return output

    def sample_timesteps(self, n, generator=None):
        """t ~ Uniform({1, ..., T}) (Algorithm 1, line 3), as indices 0 .. T-1."""
        return torch.randint(0, self.noise_steps, (n,), device=self.device, generator=generator)

    @torch.inference_mode()
    def sample(self, model, n, labels=None, cfg_scale=3, steps=None, generator=None, progress=True):
        """n images as uint8 (n, C, H, W): ancestral sampling over all T steps (Algorithm 2), or deterministic DDIM
        with `steps` steps. labels: class indices (n,) or multi-hot vectors (n, num_classes), or None for
        unconditional samples; cfg_scale: classifier-free guidance weight (1: plain conditional, 0: unconditional)."""
        x = torch.randn((n, self.channels, *self.img_size), device=self.device, generator=generator)
        x = self.denoise(model, x, labels, cfg_scale, steps, generator, progress)
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    @torch.inference_mode()
    def denoise(self, model, x, labels=None, cfg_scale=3, steps=None, generator=None, progress=False):
        """Run the reverse process from the noise x = x_T down to x_0 (float, about [-1, 1])."""
        labels = self.check_labels(model, labels, len(x))
        T = self.noise_steps
        ancestral = steps is None or steps == T
        if not ancestral and not 1 <= steps <= T:
            raise UserError(f"steps={steps}: expected 1 .. {T} (or None for all T ancestral steps)")
        timesteps = list(range(T - 1, -1, -1)) if ancestral else self.ddim_timesteps(steps)
        was_training = model.training
        model.eval()
        for i, step in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
            t = torch.full((len(x),), step, device=x.device, dtype=torch.long)
            output = self.guided_output(model, x, t, labels, cfg_scale).float()
            alpha_hat, beta = self.alpha_hat_list[step], self.beta_list[step]
            alpha_hat_next = self.alpha_hat_list[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
            # The predicted x_0, clipped to the data range as in the paper's released code: from eps it divides by
            # sqrt(alpha_hat) ~ 0.006 at high noise, and a young model's small eps errors would throw it far out.
            x0 = self.predicted_x0(output, x, alpha_hat).clamp(-1, 1)
            if ancestral:  # Algorithm 2, line 4, as the posterior mean of eq. 7 (the same when x_0 is not clipped)
                x = (math.sqrt(alpha_hat_next) * beta * x0 + math.sqrt(1 - beta) * (1 - alpha_hat_next) * x) / (1 - alpha_hat)
                if step > 0:
                    x = x + math.sqrt(beta) * torch.randn(x.shape, device=x.device, generator=generator)  # sigma_t^2 = beta_t
            else:  # DDIM with eta = 0 (Song et al. 2021, eq. 12), with the eps that matches the clipped x_0
                eps = (x - math.sqrt(alpha_hat) * x0) / math.sqrt(1 - alpha_hat)
                x = math.sqrt(alpha_hat_next) * x0 + math.sqrt(1 - alpha_hat_next) * eps
        model.train(was_training)
        return x

    def ddim_timesteps(self, steps):
        """`steps` distinct timesteps from T-1 down to 0, spaced quadratically: dense at low noise, where the first-order
        DDIM step loses most (Song et al. 2021, appendix D.2, as for their CIFAR-10 model)."""
        t = [int((self.noise_steps - 1) * f * f) for f in torch.linspace(1, 0, steps).tolist()]
        for k in range(steps - 2, -1, -1):
            t[k] = max(t[k], t[k + 1] + 1)  # rounding down repeats small timesteps: keep every step distinct
        return t

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


# ---------------------------------------------------------------------------------------------------------------
# Training (Algorithm 1), shared with ddpm_conditional.py
# ---------------------------------------------------------------------------------------------------------------

# Options that may change when a run resumes; any other difference means a different run.
RESUMABLE_CHANGES = {"epochs", "lr", "sample_steps", "save_every", "log_every", "device", "amp", "channels_last",
                     "compile", "num_workers", "data_dir", "cfg_scale"}


def make_model(config):
    """The UNet a configuration describes (conditional when it has num_classes)."""
    if getattr(config, "num_classes", None):
        return UNet_conditional(config.channels, config.channels, num_classes=config.num_classes,
                                width=config.width, attention=config.attention)
    return UNet(config.channels, config.channels, width=config.width, attention=config.attention)


def make_diffusion(config, device):
    return Diffusion(config.noise_steps, config.beta_start, config.beta_end, config.img_size, device,
                     config.channels, config.schedule, config.prediction, config.loss_weighting, config.min_snr_gamma)


def make_optimizer(model, lr, device):
    """AdamW as one fused kernel where torch has one (CUDA, CPU), else as foreach (one call per operation)."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=fused, foreach=not fused)


def check_config(c):
    size = image_size(c.img_size)
    if len(size) != 2 or not all(type(s) is int and s > 0 and s % 8 == 0 for s in size):
        raise UserError(f"img_size={c.img_size}: height and width must be positive and divisible by 8 "
                        f"(the UNet halves them 3 times), e.g. 32, 64 or (64, 128)")
    if c.width < 4 or c.width % 4:
        raise UserError(f"width={c.width}: must be a positive multiple of 4")
    if not set(c.attention) <= {1, 2, 4, 8}:
        raise UserError(f"attention={c.attention}: factors must be among 1, 2, 4, 8")
    for name in ("epochs", "batch_size", "noise_steps", "sample_steps", "log_every"):
        if getattr(c, name) < 1:
            raise UserError(f"{name}={getattr(c, name)}: must be at least 1")
    if not 0 <= getattr(c, "cfg_drop", 0) < 1:
        raise UserError(f"cfg_drop={c.cfg_drop}: must be in [0, 1)")
    if c.channels not in (None, 1, 3):
        raise UserError(f"channels={c.channels}: expected 1, 3 or None (the dataset's)")


def drop_labels(labels, p, generator=None, shard=(0, 1)):
    """Classifier-free guidance training: each sample's label becomes the null condition with probability p,
    independently (Ho & Salimans 2022, Algorithm 1). Null: -1 for class indices, all zeros for multi-hot.
    shard: (rank, world_size), see train_step."""
    drop = share(lambda m: torch.rand(m, device=labels.device, generator=generator), len(labels), shard) < p
    if labels.is_floating_point():
        return labels * ~drop[:, None]
    return torch.where(drop, -1, labels)


def share(draw, n, shard):
    """This process's n of the random numbers draw(n * world_size) made for the whole global batch: under torchrun
    every process draws the same numbers (same generator state) and keeps its own slice, so N processes compute
    what one process would with the global batch."""
    rank, world_size = shard
    return draw(n * world_size)[rank * n:(rank + 1) * n]


def train_step(model, ema_model, ema, optimizer, diffusion, images, labels, generator, config, amp_dtype,
               shard=(0, 1), scaler=None):
    """One optimizer step of Algorithm 1 on a batch of uint8 images (the target and the weight of the squared error
    follow diffusion.prediction and diffusion.loss_weighting); returns the loss as a tensor (no host sync).
    shard: (rank, world_size) of this process when the global batch is split across processes (torchrun).
    scaler: a torch.amp.GradScaler for float16 autocast: a step whose gradients overflow is skipped."""
    x0 = images.float() / 127.5 - 1  # [0, 255] -> [-1, 1]
    n, device = len(x0), x0.device
    if config.flip:  # random horizontal flips
        flip = share(lambda m: torch.rand(m, device=device, generator=generator), n, shard) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t = share(lambda m: diffusion.sample_timesteps(m, generator), n, shard)
    noise = share(lambda m: torch.randn((m, *x0.shape[1:]), device=device, generator=generator), n, shard)
    x_t, noise = diffusion.noise_images(x0, t, noise)
    if config.channels_last:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    with autocast(x0.device, amp_dtype):
        if labels is None:
            predicted = model(x_t, t)
        else:
            predicted = model(x_t, t, drop_labels(labels, config.cfg_drop, generator, shard))
    squared_error = (predicted.float() - diffusion.training_target(x0, noise, t)).square().mean(dim=(1, 2, 3))
    loss = (diffusion.loss_weight(t) * squared_error).mean()  # Algorithm 1, line 5: || eps - eps_theta(x_t, t) ||^2
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:  # float16: the loss scaled up so that small gradients do not flush to zero; inf/NaN gradients skip the step
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    ema.step_ema(ema_model, model, config.ema_start)
    return loss.detach()


def sample_grid(diffusion, ema_model, config, amp_dtype, device):
    """The images written after each epoch: a row of 8 per class (at most 10 classes), or 8 x 8 unconditional, from
    the same noise every epoch (so the grids show progress), with DDIM."""
    num_classes = getattr(config, "num_classes", None)
    labels = torch.arange(min(num_classes, 10), device=device).repeat_interleave(8) if num_classes else None
    n, cfg_scale = (64, 1) if labels is None else (len(labels), config.cfg_scale)
    generator = torch.Generator(device).manual_seed(config.seed)
    with autocast(device, amp_dtype):
        return diffusion.sample(ema_model, n, labels, cfg_scale, config.sample_steps, generator, progress=False)


def train(config, conditional=False):
    """Train a UNet on config.dataset; resumes from models/<run_name>/train_state.pt when it exists."""
    c = argparse.Namespace(**vars(config))  # filled in below; the caller's stays as it was
    check_config(c)
    device, rank, world_size = setup_distributed(pick_device(c.device))
    c.world_size = world_size  # processes (torchrun): the global batch is world_size * batch_size
    try:
        return train_on(c, conditional, device, rank, world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def setup_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL on CUDA (one GPU per process, LOCAL_RANK) and
    gloo on the CPU. Returns (device, rank, world_size); a plain `python` run is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"torchrun: distributed training runs on CUDA (NCCL) or the CPU (gloo), not on {device}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world_size


def train_on(c, conditional, device, rank, world_size):
    """The training loop. Under torchrun each process trains on its slice of every global batch of
    world_size * batch_size images (DistributedDataParallel averages the gradients, so the weights, the optimizer and
    the EMA stay identical on every process); only rank 0 writes files and shows progress."""
    log = print if rank == 0 else lambda *args: None
    amp = amp_dtype(device, c.amp)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    models_dir, results_dir = setup_logging(c.run_name)
    state_path = models_dir / "train_state.pt"
    state = read_checkpoint(state_path) if state_path.exists() else None

    dataset = load_dataset(c.dataset, c.img_size, c.channels, "train", c.data_dir, c.num_images, c.seed)
    c.channels, c.classes = dataset.channels, dataset.classes
    c.flip = default_flip(c.dataset) if c.flip is None else c.flip
    if conditional:
        c.num_classes = c.num_classes or len(dataset.classes)
        if len(dataset.classes) > c.num_classes:
            raise UserError(f"labels outside num_classes: '{c.dataset}' has {len(dataset.classes)} classes, "
                            f"but num_classes={c.num_classes}")
    if state is not None:
        check_same_run(state["config"], vars(c), models_dir)

    torch.manual_seed(c.seed)
    model = make_model(c).to(device, memory_format=torch.channels_last if c.channels_last else torch.preserve_format)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model, c.lr, device)
    ema = EMA(c.ema_beta)
    diffusion = make_diffusion(c, device)
    generator = torch.Generator(device).manual_seed(c.seed)  # every random draw of training comes from here
    epoch, batch, step, losses = 0, 0, 0, []
    if state is not None:
        load_weights(model, state["model"], f"{state_path} (model)")
        load_weights(ema_model, state["ema_model"], f"{state_path} (ema_model)")
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = c.lr
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        resume_random_stream(generator, state, device, log)
        ema.step, epoch, batch, step, losses = state["ema_step"], state["epoch"], state["batch"], state["step"], state["losses"]
        log(f"resuming {models_dir} at epoch {epoch + 1}, step {step}")
    if epoch >= c.epochs:
        log(f"{models_dir} has already trained {epoch} epochs (--epochs {c.epochs}): nothing to do")
        return model, ema_model
    if rank == 0:
        save_json(vars(c), models_dir / "config.json")
    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if c.compile:
        train_model = torch.compile(train_model)
    loader = get_data(dataset, c.batch_size, c.seed, c.num_workers, device, rank, world_size)
    log(f"{len(dataset)} images, {len(loader)} steps per epoch, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, on {device}{f' with {str(amp)[6:]} autocast' if amp else ''}"
        f"{f', {world_size} processes, global batch {world_size * c.batch_size}' if world_size > 1 else ''}")

    def save(epoch, batch):
        """Write the checkpoints; called only after a finite loss, so a diverged run never overwrites a good one.
        Tensors go to the CPU first: the files load on any machine. Only rank 0 writes."""
        if rank != 0:
            return
        weights, ema_weights = cpu_state(model), cpu_state(ema_model)
        save_checkpoint(weights, models_dir / "ckpt.pt")
        save_checkpoint(ema_weights, models_dir / "ema_ckpt.pt")
        save_checkpoint({"model": weights, "ema_model": ema_weights, "optimizer": optimizer.state_dict(),
                         "ema_step": ema.step, "generator": generator.get_state(), "generator_device": device.type,
                         "scaler": scaler.state_dict() if scaler else {}, "epoch": epoch, "batch": batch,
                         "step": step, "losses": losses, "config": vars(c)}, state_path)

    while epoch < c.epochs:
        loader.sampler.set_epoch(epoch, start=batch)
        progress = tqdm(loader, desc=f"epoch {epoch + 1}/{c.epochs}", initial=batch, total=len(loader),
                        disable=rank != 0)
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        for images, labels in progress:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True) if conditional else None
            window_loss += train_step(train_model, ema_model, ema, optimizer, diffusion, images, labels, generator,
                                      c, amp, (rank, world_size), scaler)
            step, batch, window_steps = step + 1, batch + 1, window_steps + 1
            save_now = c.save_every and step % c.save_every == 0 and batch < len(loader)
            if step % c.log_every == 0 or batch == len(loader) or save_now:  # read the loss: waits for the device
                if world_size > 1:  # the mean over all processes: every rank sees the same and stops alike
                    dist.all_reduce(window_loss)
                    window_loss /= world_size
                loss = window_loss.item() / window_steps
                if not math.isfinite(loss):
                    raise UserError(f"the loss became {loss} by step {step}: training stopped, and the last good "
                                    f"checkpoint in {models_dir} is kept (try a lower --lr, or --amp False)")
                losses.append((step, loss))
                rate = window_steps * c.batch_size * world_size / (time.perf_counter() - window_start)
                progress.set_postfix(loss=f"{loss:.4f}", img_per_s=f"{rate:.0f}")
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if save_now:
                save(epoch, batch)
        progress.close()
        epoch, batch = epoch + 1, 0
        save(epoch, batch)
        if rank == 0:
            save_images(sample_grid(diffusion, ema_model, c, amp, device), results_dir / f"{epoch}.jpg")
            save_loss_plot(losses, results_dir / "loss.png")
    log(f"done: {models_dir}/ema_ckpt.pt, sample grids in {results_dir}/")
    return model, ema_model


def resume_random_stream(generator, state, device, log):
    """Continue the run's random stream; a run saved on another kind of device (e.g. trained on a GPU, resumed on the
    CPU) has a generator state this one cannot take, so its stream goes on from (seed, step) instead."""
    same_kind = len(state["generator"]) == len(generator.get_state())  # files written before generator_device
    saved_on = state.get("generator_device") or (device.type if same_kind else "another device")
    if saved_on == device.type:
        generator.set_state(state["generator"])
    else:
        generator.manual_seed(state["config"]["seed"] * 1_000_003 + state["step"])
        log(f"resuming on {device.type} a run saved on {saved_on}: its random draws go on from a new stream "
            f"(seed {state['config']['seed']}, step {state['step']}), so they differ from an uninterrupted run's")


def cpu_state(model):
    return {k: v.cpu() for k, v in model.state_dict().items()}


def check_same_run(saved, current, models_dir):
    differ = [f"{k}={saved[k]!r}, now {current[k]!r}" for k in saved.keys() & current.keys()
              if k not in RESUMABLE_CHANGES and saved[k] != current[k]]
    if differ:
        raise UserError(f"{models_dir} holds a run with other settings ({'; '.join(differ)}): pass another "
                        f"--run_name, or delete {models_dir} to start this one afresh")


def save_json(obj, path):
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def main(constants, conditional=False):
    """Run a training script: its constants, overridden by the command line; a UserError is one line, no traceback."""
    try:
        train(parse_config(constants, description=sys.modules["__main__"].__doc__), conditional)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("stopped: the last checkpoint is kept; run the same command to resume")


if __name__ == "__main__":
    main(globals())
