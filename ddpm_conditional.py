"""Class-conditional DDPM with classifier-free guidance (Ho & Salimans 2022) and an EMA copy of the weights.

    python ddpm_conditional.py                          # built-in "shapes" data (33 min on a 2-core CPU; bf16: 14-17)
    python ddpm_conditional.py --dataset cifar10 --img_size 64 --width 64 --attention 1,2,4,8 --epochs 300
    python ddpm_conditional.py --dataset multishapes --run_name multishapes   # multi-hot labels (attributes)

Every UPPERCASE constant below is also a command-line option of the same name in lower case. Below them, what makes
training conditional: each sample's label is dropped to the null condition with probability CFG_DROP (so one network
learns the conditional and the unconditional model), the EMA update after each step, and the sample grid, guided with
CFG_SCALE (the mix itself: Diffusion.guided_output in ddpm.py). Checkpoints: models/<RUN_NAME>/{ckpt,ema_ckpt,
train_state}.pt; grids (one row per class, or per attribute) and the loss curve: results/<RUN_NAME>/. Running the
same command again resumes (the loop, checkpoints and torchrun are in training.py).
"""
import torch

from ddpm import Diffusion
from modules import EMA, UNet_conditional
from training import gather, load_run, run_script, share
from utils import autocast, plot_images

__all__ = ["Diffusion", "EMA", "UNet_conditional", "load_run", "plot_images", "sample_grid", "train_step"]

# --- data ---
RUN_NAME = "DDPM_conditional"  # files go to models/<RUN_NAME>/ and results/<RUN_NAME>/
# DATASET: "shapes" or "multishapes" (built in; multishapes: 1 to 3 shapes an image, multi-hot labels), "cifar10",
# "mnist", "fashion_mnist", a FER-2013 .csv, an attribute table (CelebA's list_attr_celeba.txt, or a .csv), or a folder
DATASET = "shapes"
DATA_DIR = "data"         # where torchvision datasets are downloaded to / looked for
NUM_IMAGES: int | None = None  # a fixed random subset of this many training images (None: all; "shapes": 10000)
IMG_SIZE = 32             # int, or (height, width); divisible by 8
CHANNELS: int | None = None  # None: the dataset's (1 grayscale, 3 RGB)
FLIP: bool | None = None  # random horizontal flips; None: the dataset's (on, off for mnist, fashion_mnist)
NUM_CLASSES: int | None = None  # None: the dataset's
ATTRIBUTES: str | None = None  # multi-label data: the attributes to learn, e.g. "Smiling,Eyeglasses" (None: all)
# --- model ---
WIDTH = 16                # channels at full resolution; tutorial: 64
ATTENTION = (8,)          # self-attention at these downsampling factors; tutorial: (1, 2, 4, 8), all six blocks
NORM_GROUPS = 8           # GroupNorm groups in every convolution block (must divide WIDTH); tutorial: 1
RES_BLOCKS = 1            # residual blocks in each Down and Up level before the one that changes the width; tutorial: 1
BOTTLENECK_EMBEDDING = False  # the time/label embedding enters the bottleneck too (README); tutorial: False
FILM = True               # the time/label embedding as a per-channel scale and shift; tutorial: False (added)
# --- diffusion ---
NOISE_STEPS = 1000        # T
BETA_START, BETA_END = 1e-4, 0.02
SCHEDULE = "cosine"       # "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020, the tutorial's)
PREDICTION = "v"          # what the UNet predicts: "v" (Salimans & Ho 2022), "eps" (the tutorial's) or "x0"
LOSS_WEIGHTING = "min_snr"  # "min_snr" (Hang et al. 2023) or "none" (plain MSE, the tutorial's)
MIN_SNR_GAMMA = 5.0
TIMESTEPS = "importance"  # how training draws t: "importance" (the logit-normal's objective, drawn where its loss
                          # varies most, Nichol & Dhariwal 2021), "logit_normal" (Esser et al. 2024) or "uniform"
                          # (the tutorial's)
# --- training ---
EPOCHS = 24
BATCH_SIZE = 16           # images a step; tutorial: 14. On a CPU more steps beat bigger batches (README)
GRAD_ACCUM = 1            # micro-batches of BATCH_SIZE per optimizer step (a big model on a small GPU): same result
LR = 2e-3                 # peak learning rate; tutorial: 3e-4
LR_WARMUP = 200           # steps of linear warm-up from 0 to LR; tutorial: 0
LR_SCHEDULE = "cosine"    # then "cosine" or "linear" decay to 0 at the last step, or "constant" (the tutorial's)
OPTIMIZER = "adamw"       # "adamw" (the tutorial's) or "muon" (Muon for the weight matrices, AdamW for the rest)
CFG_DROP = 0.1            # probability that a sample's label is replaced by the null condition
CFG_SCALE = 3.0           # guidance scale of the sample grids: 1 conditional, 0 unconditional, >1 guided
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


def drop_labels(labels, p, generator=None, shard=(0, 1)):
    """Classifier-free guidance training: each sample's label becomes the null condition with probability p,
    independently (Ho & Salimans 2022, Algorithm 1). Null: -1 for class indices, all zeros for multi-hot vectors."""
    drop = share(lambda m: torch.rand(m, device=labels.device, generator=generator), len(labels), shard) < p
    if labels.is_floating_point():
        return labels * ~drop[:, None]
    return torch.where(drop, -1, labels)


def train_step(model, ema_model, ema, optimizer, diffusion, images, labels, generator, config, amp_dtype, shard=(0, 1),
               scaler=None):
    """One optimizer step of Algorithm 1 with labels, then the EMA update; returns the loss as a tensor (no host
    sync). shard and scaler: as in ddpm.train_step."""
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
    labels = drop_labels(labels, config.cfg_drop, generator, shard)  # each sample's, with probability CFG_DROP
    optimizer.zero_grad(set_to_none=True)
    micro, total, losses = n // config.grad_accum, 0.0, []  # GRAD_ACCUM micro-batches (see ddpm.train_step)
    for part in (slice(i, i + micro) for i in range(0, n, micro)):
        with autocast(device, amp_dtype):
            predicted = model(x_t[part], t[part], labels[part])
        losses.append(diffusion.loss(predicted, x0[part], noise[part], t[part]))
        loss = (diffusion.importance_weight(t[part]) * losses[-1]).mean() / config.grad_accum
        (loss if scaler is None else scaler.scale(loss)).backward()  # float16: scaled (see ddpm.train_step)
        total += loss.detach()
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    ema.step_ema(ema_model, model, config.ema_start)  # ema = EMA_BETA * ema + (1 - EMA_BETA) * weights
    if diffusion.timesteps == "importance":  # see ddpm.train_step
        diffusion.learn_proposal(gather(t, shard), gather(torch.cat(losses).detach(), shard))
    return total


def grid_labels(config, per_row=8):
    """The labels of the sample grid, a row of `per_row` each: one row per class (at most 10 classes); for
    multi-label data, one row per attribute alone (at most 8), then the first two together, the first three
    together."""
    if not config.multi_label:
        return torch.arange(min(config.num_classes, 10)).repeat_interleave(per_row)
    n = config.num_classes
    attribute = torch.arange(n)
    rows = [attribute == i for i in range(min(n, 8))] + [attribute < k for k in (2, 3) if k <= n]
    return torch.stack(rows).float().repeat_interleave(per_row, dim=0)


def sample_grid(diffusion, ema_model, config, amp_dtype, device):
    """The images written after each epoch, a row for each of grid_labels, guided with CFG_SCALE, from the same
    noise every epoch (so the grids show progress)."""
    labels = grid_labels(config).to(device)
    generator = torch.Generator(device).manual_seed(config.seed)
    with autocast(device, amp_dtype):
        return diffusion.sample(ema_model, len(labels), labels, config.cfg_scale, config.sample_steps, generator,
                                progress=False, sampler=config.sampler)


if __name__ == "__main__":
    run_script(globals(), train_step, sample_grid, conditional=True)
