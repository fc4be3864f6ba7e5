"""Class-conditional DDPM with classifier-free guidance (Ho & Salimans 2022) and an EMA copy of the weights.

    python ddpm_conditional.py                          # built-in "shapes" data (33 min on a 2-core CPU)
    python ddpm_conditional.py config/tutorial.py       # the tutorial's setting: CIFAR-10 at 64x64 (a GPU run)
    python ddpm_conditional.py config/fashion_mnist.py  # presets are in config/; options override them:
    python ddpm_conditional.py --dataset multishapes --run_name multishapes   # multi-hot labels (attributes)

Every UPPERCASE constant below is an option, in lower case (--help). What makes training conditional: each sample's
label dropped to the null condition with probability CFG_DROP (drop_labels: one network learns the conditional and the
unconditional model), the EMA update (train_step), and the sample grid guided with CFG_SCALE (Diffusion.guided_output
in ddpm.py). Checkpoints go to models/<RUN_NAME>/, grids (a row per class or attribute) and the loss curve to
results/<RUN_NAME>/; the same command resumes.
"""
import argparse
import copy
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoints import read_train_state, resume, save_train_state
from data import complete_config, get_data, load_dataset
from ddpm import Diffusion, load_run, make_diffusion, make_model
from importance import ImportanceSampler
from modules import EMA, UNet_conditional
from optimizers import make_optimizer
from options import check_config, clear_errors, parse_config
from utils import (all_gather, amp_dtype, autocast, check_attention_memory, distributed, grad_scaler,
                   learning_rate, local_rank_zero_first, make_logger, mean_loss, no_sync, plot_images,
                   save_and_stop_on_ctrl_c, save_images, save_loss_plot, save_progress_gif, setup_logging, time_left)

__all__ = ["Diffusion", "EMA", "UNet_conditional", "load_run", "plot_images", "save_images"]

# --- the tutorial's knobs ---
RUN_NAME = "DDPM_conditional"  # files go to models/<RUN_NAME>/ and results/<RUN_NAME>/
DATASET = "shapes"        # "shapes" or "multishapes" (built in, no download; multishapes: 1 to 3 shapes an image,
                          # multi-hot labels), "cifar10", "mnist", "fashion_mnist", a folder of class subfolders, a
                          # FER-2013 .csv, or an attribute table (CelebA's list_attr_celeba.txt, or a .csv)
IMG_SIZE = 32             # an int, or (height, width); divisible by 8; tutorial: 64
NUM_CLASSES: int | None = None  # None: the dataset's; tutorial: 10
WIDTH = 16                # channels at full resolution; tutorial: 64
ATTENTION = (8,)          # self-attention at these downsampling factors, among 1, 2, 4, 8; tutorial: all four
EPOCHS = 24               # tutorial: 300
BATCH_SIZE = 16           # images a step; tutorial: 14. On a CPU more steps beat bigger batches
LR = 2e-3                 # peak learning rate; tutorial: 3e-4
CFG_DROP = 0.1            # probability that a sample's label is replaced by the null condition
CFG_SCALE = 3.0           # guidance scale of the sample grids: 0 or 1 conditional (unguided), >1 guided
EMA_BETA = 0.99           # EMA decay, matched to a short run; tutorial: 0.995
EMA_START = 300           # steps during which the EMA model just copies the weights; tutorial: 2000
# --- beyond the tutorial: the measured recipe (docs/measurements.md) ---
NORM_GROUPS = 8           # GroupNorm groups in every convolution block (must divide WIDTH); tutorial: 1
FILM = True               # the time/label embedding as a per-channel scale and shift; tutorial: False (added)
SCHEDULE = "cosine"       # "cosine" (Nichol & Dhariwal 2021) or "linear" (Ho et al. 2020; tutorial)
PREDICTION = "v"          # what the UNet predicts: "v" (Salimans & Ho 2022) or "eps" (tutorial)
LOSS_WEIGHTING = "min_snr"  # "min_snr" (Hang et al. 2023, gamma 5) or "none" (plain MSE; tutorial)
TIMESTEPS = "importance"  # how training draws t: "importance" (the logit-normal's objective, drawn where its loss
                          # varies most), "logit_normal" (Esser et al. 2024) or "uniform" (tutorial)
LR_WARMUP = 200           # steps of linear warm-up from 0 to LR; tutorial: 0
LR_SCHEDULE = "cosine"    # then "cosine" decay to 0 at the last step, or "constant" (tutorial)
OPTIMIZER = "adamw"       # "adamw" (tutorial) or "muon" (Muon for the weight matrices, AdamW for the rest)
SAMPLER = "ddim"          # the sample grid's sampler: "ddim", "dpm++" (DPM-Solver++(2M)) or "ancestral" (tutorial)
SAMPLE_STEPS = 20         # its steps (20: as good as 50; "ancestral" takes all 1000)
# --- data and machine ---
# (and --data_dir, --save_every, --compile: every script's, command-line only, in options.py)
NUM_IMAGES: int | None = None  # a fixed random subset of this many training images (None: all; "shapes": 10000)
ATTRIBUTES: str | None = None  # multi-label data: the attributes to learn, e.g. "Smiling,Eyeglasses" (None: all)
FLIP: bool | None = None  # random horizontal flips; None: the dataset's (off for mnist and fashion_mnist)
GRAD_ACCUM = 1            # micro-batches of BATCH_SIZE per optimizer step (a big model on a small GPU): same result
SEED = 0
DEVICE = "auto"           # "auto": CUDA, else Apple MPS, else CPU; or "cpu", "cuda", "cuda:1", "mps"
AMP: bool | str = True    # mixed precision: bf16 where native, fp16 on older CUDA GPUs, else fp32; or "bf16", "fp16"
LOGGER: str | None = None  # the loss, LR and sample grids also to "tensorboard" (runs/<RUN_NAME>/, as the tutorial)
                           # or "wandb" (offline: WANDB_MODE=offline); each needs its package


def drop_labels(labels, p, generator=None, rank=0, world_size=1):
    """Classifier-free guidance training: each sample's label becomes the null condition with probability p,
    independently (Ho & Salimans 2022, Algorithm 1). Null: -1 for class indices, all zeros for multi-hot vectors."""
    n = len(labels)
    drop = torch.rand(n * world_size, device=labels.device, generator=generator)[rank * n:(rank + 1) * n] < p
    if labels.is_floating_point():
        return labels * ~drop[:, None]
    return torch.where(drop, -1, labels)


def train_step(model, ema_model, ema, optimizer, diffusion, images, labels, generator, c, amp=None, scaler=None,
               importance=None, rank=0, world_size=1):
    """One optimizer step of Algorithm 1 with labels, each dropped with probability CFG_DROP, then the EMA update;
    returns the loss as a tensor (no wait for the device). scaler, importance, rank, world_size: as in ddpm.py."""
    x0 = images.float() / 127.5 - 1  # [0, 255] -> [-1, 1]
    n, N, device = len(x0), len(x0) * world_size, x0.device
    mine = slice(rank * n, (rank + 1) * n)  # this process's slice of the global batch (see ddpm.train_step)
    if c.flip:  # random horizontal flips
        flip = torch.rand(N, device=device, generator=generator)[mine] < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    t = (importance or diffusion).sample_timesteps(N, generator)[mine]  # Algorithm 1, line 3
    noise = torch.randn((N, *x0.shape[1:]), device=device, generator=generator)[mine]  # line 4: eps ~ N(0, I)
    x_t, noise = diffusion.noise_images(x0, t, noise)
    labels = drop_labels(labels, c.cfg_drop, generator, rank, world_size)  # each sample's, with probability CFG_DROP
    optimizer.zero_grad(set_to_none=True)
    micro, total, losses = n // c.grad_accum, 0.0, []  # GRAD_ACCUM micro-batches: their gradients add up
    for i in range(0, n, micro):
        part = slice(i, i + micro)
        with no_sync(model, last_micro_batch=i + micro >= n), autocast(device, amp):  # torchrun: one all-reduce
            predicted = model(x_t[part], t[part], labels[part])
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
    ema.step_ema(ema_model, model, c.ema_start)  # ema = EMA_BETA * ema + (1 - EMA_BETA) * weights
    if importance is not None:  # the next steps' t are drawn by the whole global batch's losses
        importance.update(all_gather(t, world_size), all_gather(torch.cat(losses).detach(), world_size))
    return total


def grid_labels(c, per_row=8):
    """The labels of the sample grid, a row of `per_row` each: one row per class (at most 10 classes); for
    multi-label data, one row per attribute alone (at most 8), then the first two together, the first three."""
    if not c.multi_label:
        return torch.arange(min(c.num_classes, 10)).repeat_interleave(per_row)
    attribute = torch.arange(c.num_classes)
    rows = [attribute == i for i in range(min(c.num_classes, 8))] + [attribute < k for k in (2, 3)
                                                                      if k <= c.num_classes]
    return torch.stack(rows).float().repeat_interleave(per_row, dim=0)


def sample_grid(diffusion, ema_model, c, amp, device):
    """The images written after each epoch, a row for each of grid_labels, guided with CFG_SCALE, from the same noise
    every epoch (so the grids show progress)."""
    labels = grid_labels(c).to(device)
    generator = torch.Generator(device).manual_seed(c.seed)
    with autocast(device, amp):
        return diffusion.sample(ema_model, len(labels), labels, c.cfg_scale,
                                None if c.sampler == "ancestral" else c.sample_steps, generator, progress=False,
                                sampler=c.sampler)


def train(config):
    """Train a class-conditional UNet on the data of `config` (the constants above, lower-case), a guided sample grid
    after each epoch; resumes the run in models/<run_name>/ where one is. Returns (model, ema_model)."""
    c = argparse.Namespace(**vars(config))  # completed below from the data; the caller's stays as it was
    check_config(c)
    with distributed(c.device) as (device, rank, world_size):  # torchrun: one process per GPU
        log = print if rank == 0 else lambda *args: None
        with local_rank_zero_first():  # torchrun: one process downloads, then the others read
            dataset = load_dataset(c.dataset, c.img_size, None, "train", c.data_dir, c.num_images, c.seed,
                                   c.attributes)
        complete_config(c, dataset, conditional=True)  # channels, classes, num_classes, multi-hot labels or not
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
                for images, labels in pbar:
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(c, step, len(dataloader))
                    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    total += train_step(train_model, ema_model, ema, optimizer, diffusion, images, labels, generator,
                                        c, amp, scaler, importance, rank, world_size)
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


if __name__ == "__main__":
    with clear_errors():  # bad input: one line, no traceback
        train(parse_config(globals()))
