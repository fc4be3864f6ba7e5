"""The machinery around the training step that no tutorial video teaches, shared by ddpm.py and ddpm_conditional.py:
the loop over epochs, checkpoint files and exact resume, torchrun (DistributedDataParallel), the loss readout and its
NaN stop, the command-line options, the optimizers (AdamW, or Muon), and load_run, which loads a trained run in one
call.

Each script keeps its own algorithm (its train_step and sample_grid) and hands them to train().
"""
import argparse
import ast
import copy
import json
import math
import os
import sys
import time
import typing
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from modules import EMA, UNet, UNet_conditional
from utils import (UserError, amp_dtype, attribute_names, default_flip, get_data, image_size, load_dataset,
                   pick_device, replace_atomically, save_images, save_loss_plot, save_progress_gif, setup_logging)

# Options that may change when a run resumes; any other difference means a different run.
RESUMABLE_CHANGES = {"epochs", "lr", "sample_steps", "save_every", "log_every", "device", "amp", "channels_last",
                     "compile", "num_workers", "data_dir", "cfg_scale", "sampler"}
OPTIMIZERS = ("adamw", "muon")  # the kinds make_optimizer builds
# Settings that config.json files written by earlier versions lack, with the value those runs had.
EARLIER_DEFAULTS = {"num_classes": None, "flip": True, "cfg_drop": 0.0, "lr_warmup": 0, "lr_schedule": "constant",
                    "norm_groups": 1, "film": False, "timesteps": "uniform", "grad_accum": 1, "sampler": "ddim",
                    "attributes": None, "multi_label": False, "res_blocks": 1, "optimizer": "adamw",
                    "bottleneck_embedding": False}


def run_script(constants, train_step, sample_grid, conditional):
    """`python ddpm.py` / `python ddpm_conditional.py`: the script's constants, overridden by the command line, then
    train(); a UserError is one line, no traceback."""
    try:
        config = parse_config(constants, description=constants["__doc__"])
        train(config, train_step, sample_grid, conditional)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("stopped: the last checkpoint is kept; run the same command to resume")


def train(config, train_step, sample_grid, conditional):
    """Train a UNet on config.dataset with the script's train_step, writing sample_grid's images after each epoch;
    resumes from models/<run_name>/train_state.pt when it exists. Returns (model, ema_model)."""
    c = argparse.Namespace(**vars(config))  # filled in below; the caller's stays as it was
    check_config(c, conditional)
    device, rank, world_size = setup_distributed(pick_device(c.device))
    c.world_size = world_size  # processes (torchrun): the global batch is world_size * batch_size * grad_accum
    try:
        return train_on(c, train_step, sample_grid, conditional, device, rank, world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train_on(c, train_step, sample_grid, conditional, device, rank, world_size):
    """The loop. Under torchrun each process trains on its slice of every global batch of world_size * batch_size *
    grad_accum images (DistributedDataParallel averages the gradients, so the weights, the optimizer and the EMA stay
    identical on every process); only rank 0 writes files and shows progress. Checkpoints are written between
    optimizer steps only, never inside one step's micro-batches, so a resume is exact with GRAD_ACCUM too."""
    log = print if rank == 0 else lambda *args: None
    models_dir, results_dir = setup_logging(c.run_name)
    dataset = load_dataset(c.dataset, c.img_size, c.channels, "train", c.data_dir, c.num_images, c.seed,
                           getattr(c, "attributes", None))  # (ddpm.py has no ATTRIBUTES)
    complete_config(c, dataset, conditional)
    state = read_checkpoint(models_dir / "train_state.pt") if (models_dir / "train_state.pt").exists() else None
    if state is not None:
        check_same_run(state["config"], vars(c), models_dir)
    run = start_run(c, device, state, log)
    if run.epoch >= c.epochs:
        log(f"{models_dir} has already trained {run.epoch} epochs (--epochs {c.epochs}): nothing to do")
        return run.model, run.ema_model
    if rank == 0:
        save_json(vars(c), models_dir / "config.json")
    train_model = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else run.model
    train_model = torch.compile(train_model) if c.compile else train_model
    batch = c.batch_size * c.grad_accum  # images per optimizer step and process
    loader = get_data(dataset, batch, c.seed, c.num_workers, device, rank, world_size)
    log(f"{len(dataset)} images, {len(loader)} steps per epoch, {sum(p.numel() for p in run.model.parameters()):,} "
        f"parameters, on {device}{f' with {str(run.amp)[6:]} autocast' if run.amp else ''}"
        f"{f', {world_size} processes, global batch {world_size * batch}' if world_size > 1 else ''}"
        f"{f', {c.grad_accum} micro-batches of {c.batch_size} per step' if c.grad_accum > 1 else ''}")

    while run.epoch < c.epochs:
        loader.sampler.set_epoch(run.epoch, start=run.batch)
        progress = tqdm(loader, desc=f"epoch {run.epoch + 1}/{c.epochs}", initial=run.batch, total=len(loader),
                        disable=rank != 0)
        window = LossWindow(world_size)
        for images, labels in progress:
            inputs = (images.to(device, non_blocking=True),)
            if conditional:
                inputs += (labels.to(device, non_blocking=True),)
            set_learning_rate(run.optimizer, c, run.step, len(loader))
            window.add(train_step(train_model, run.ema_model, run.ema, run.optimizer, run.diffusion, *inputs,
                                  run.generator, c, run.amp, (rank, world_size), run.scaler))
            run.step, run.batch = run.step + 1, run.batch + 1
            save_now = c.save_every and run.step % c.save_every == 0 and run.batch < len(loader)
            if run.step % c.log_every == 0 or run.batch == len(loader) or save_now:
                loss, rate = window.read(run.step, batch, models_dir)
                run.losses.append((run.step, loss))
                progress.set_postfix(loss=f"{loss:.4f}", img_per_s=f"{rate:.0f}")
            if save_now and rank == 0:
                save_run(run, c, models_dir, device)
        progress.close()
        run.epoch, run.batch = run.epoch + 1, 0
        if rank == 0:
            save_run(run, c, models_dir, device)
            save_images(sample_grid(run.diffusion, run.ema_model, c, run.amp, device), results_dir / f"{run.epoch}.jpg")
            save_progress_gif(results_dir, run.epoch)
            save_loss_plot(run.losses, results_dir / "loss.png")
    log(f"done: {models_dir}/ema_ckpt.pt, sample grids in {results_dir}/")
    return run.model, run.ema_model


def check_config(c, conditional):
    size = image_size(c.img_size)
    if len(size) != 2 or not all(type(s) is int and s > 0 and s % 8 == 0 for s in size):
        raise UserError(f"img_size={c.img_size}: height and width must be positive and divisible by 8 "
                        f"(the UNet halves them 3 times), e.g. 32, 64 or (64, 128)")
    if c.width < 4 or c.width % 4:
        raise UserError(f"width={c.width}: must be a positive multiple of 4")
    if c.norm_groups < 1 or c.width % c.norm_groups:
        raise UserError(f"norm_groups={c.norm_groups}: must divide width={c.width}")
    if not set(c.attention) <= {1, 2, 4, 8}:
        raise UserError(f"attention={c.attention}: factors must be among 1, 2, 4, 8")
    if c.res_blocks < 0:
        raise UserError(f"res_blocks={c.res_blocks}: must be 0 or more")
    for name in ("epochs", "batch_size", "grad_accum", "noise_steps", "sample_steps", "log_every"):
        if getattr(c, name) < 1:
            raise UserError(f"{name}={getattr(c, name)}: must be at least 1")
    if conditional and not 0 <= c.cfg_drop < 1:
        raise UserError(f"cfg_drop={c.cfg_drop}: must be in [0, 1)")
    if c.lr_schedule not in ("constant", "cosine", "linear") or c.lr_warmup < 0:
        raise UserError(f"lr_schedule={c.lr_schedule!r}, lr_warmup={c.lr_warmup}: expected 'constant', 'cosine' or "
                        f"'linear', and a warm-up of 0 or more steps")
    if c.optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer={c.optimizer!r}: expected {' or '.join(map(repr, OPTIMIZERS))}")
    if getattr(c, "attributes", None) is not None:
        attribute_names(c.attributes)  # a clear message for a malformed --attributes before anything starts
    if c.channels not in (None, 1, 3):
        raise UserError(f"channels={c.channels}: expected 1, 3 or None (the dataset's)")
    amp_dtype("cpu", c.amp)  # a clear message for a bad --amp before anything starts
    from ddpm import check_sampler  # (ddpm.py imports this module to train)
    check_sampler(c.sampler)  # and for a bad --sampler, rather than after the first epoch


def complete_config(c, dataset, conditional):
    """Fill in what the dataset decides: channels, class (or attribute) names, whether the labels are multi-hot
    vectors (multi_label), flips, and num_classes (None: unconditional)."""
    c.channels, c.classes = dataset.channels, dataset.classes
    c.multi_label = dataset.labels.is_floating_point()
    c.flip = default_flip(c.dataset) if c.flip is None else c.flip
    if not conditional:
        c.num_classes = None
        return
    if c.multi_label and c.num_classes not in (None, len(dataset.classes)):
        raise UserError(f"num_classes={c.num_classes}: '{c.dataset}' has {len(dataset.classes)} attributes, and a "
                        f"multi-label model has one class per attribute (leave --num_classes unset)")
    c.num_classes = c.num_classes or len(dataset.classes)
    if len(dataset.classes) > c.num_classes:
        raise UserError(f"labels outside num_classes: '{c.dataset}' has {len(dataset.classes)} classes, "
                        f"but num_classes={c.num_classes}")


def start_run(c, device, state, log):
    """The model, its EMA copy, the optimizer, the diffusion and the random generator of a run, as saved in `state`
    when it resumes; also the run's position (epoch, batch, step) and its logged losses."""
    torch.manual_seed(c.seed)
    model = make_model(c).to(device, memory_format=torch.channels_last if c.channels_last else torch.preserve_format)
    amp = amp_dtype(device, c.amp)
    run = argparse.Namespace(
        model=model, ema_model=copy.deepcopy(model).requires_grad_(False),
        optimizer=make_optimizer(model, c.lr, device, c.optimizer), ema=EMA(c.ema_beta),
        diffusion=make_diffusion(c, device), amp=amp,
        scaler=torch.amp.GradScaler(device.type) if amp == torch.float16 else None,  # fp16 needs a loss scale
        generator=torch.Generator(device).manual_seed(c.seed),  # every random draw of training comes from here
        epoch=0, batch=0, step=0, losses=[])
    if state is None:
        return run
    load_weights(run.model, state["model"], "train_state.pt (model)")
    load_weights(run.ema_model, state["ema_model"], "train_state.pt (ema_model)")
    run.optimizer.load_state_dict(state["optimizer"])  # (its learning rate is set before every step)
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    resume_random_stream(run.generator, state, device, log)
    run.ema.step = state["ema_step"]
    if c.timesteps == "importance":  # the losses that set the timesteps' proposal
        run.diffusion.loss_square, run.diffusion.loss_count = (v.to(device) for v in state["timestep_losses"])
    run.epoch, run.batch, run.step, run.losses = state["epoch"], state["batch"], state["step"], state["losses"]
    log(f"resuming models/{c.run_name} at epoch {run.epoch + 1}, step {run.step}")
    return run


def save_run(run, c, models_dir, device):
    """Write the checkpoints; called only after a finite loss, so a diverged run never overwrites a good one.
    Tensors go to the CPU first: the files load on any machine."""
    weights, ema_weights = cpu_state(run.model), cpu_state(run.ema_model)
    save_checkpoint(weights, models_dir / "ckpt.pt")
    save_checkpoint(ema_weights, models_dir / "ema_ckpt.pt")
    save_checkpoint({"model": weights, "ema_model": ema_weights, "optimizer": run.optimizer.state_dict(),
                     "ema_step": run.ema.step, "generator": run.generator.get_state(), "generator_device": device.type,
                     "scaler": run.scaler.state_dict() if run.scaler else {}, "epoch": run.epoch, "batch": run.batch,
                     "step": run.step, "losses": run.losses, "config": vars(c), "timestep_losses":
                     (run.diffusion.loss_square.cpu(), run.diffusion.loss_count.cpu())
                     if c.timesteps == "importance" else None}, models_dir / "train_state.pt")


class LossWindow:
    """The losses of the steps since the last readout, summed on the device (reading one waits for the device)."""

    def __init__(self, world_size):
        self.world_size = world_size
        self.start()

    def start(self):
        self.total, self.steps, self.since = 0.0, 0, time.perf_counter()

    def add(self, loss):
        self.total, self.steps = self.total + loss, self.steps + 1

    def read(self, step, batch_size, models_dir):
        """(mean loss, images per second) of the window, then a new window. Under torchrun the mean over all
        processes, so every rank sees the same loss and stops alike; a NaN or infinite loss stops the run."""
        if self.world_size > 1:
            dist.all_reduce(self.total)
            self.total /= self.world_size
        loss = self.total.item() / self.steps
        if not math.isfinite(loss):
            raise UserError(f"the loss became {loss} by step {step}: training stopped, and the last good "
                            f"checkpoint in {models_dir} is kept (try a lower --lr, or --amp False)")
        rate = self.steps * batch_size * self.world_size / (time.perf_counter() - self.since)
        self.start()
        return loss, rate


def learning_rate(c, step, steps_per_epoch):
    """The learning rate of a step: LR after a linear warm-up over LR_WARMUP steps, then constant, or decayed to 0 at
    the run's last step (cosine, as in Loshchilov & Hutter 2017, or linear). A function of the step alone, so a
    resumed run continues on the same curve (unless --epochs changed, which stretches it)."""
    if step < c.lr_warmup:
        return c.lr * (step + 1) / c.lr_warmup
    if c.lr_schedule == "constant":
        return c.lr
    progress = min(1.0, (step - c.lr_warmup) / max(1, c.epochs * steps_per_epoch - c.lr_warmup))
    return c.lr * (0.5 * (1 + math.cos(math.pi * progress)) if c.lr_schedule == "cosine" else 1 - progress)


def set_learning_rate(optimizer, c, step, steps_per_epoch):
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(c, step, steps_per_epoch)


def share(draw, n, shard):
    """This process's n of the random numbers draw(n * world_size) made for the whole global batch: under torchrun
    every process draws the same numbers (same generator state) and keeps its own slice, so N processes compute
    what one process would with the global batch. shard: (rank, world_size)."""
    rank, world_size = shard
    return draw(n * world_size)[rank * n:(rank + 1) * n]


def gather(x, shard):
    """The whole global batch's values from every process's slice of them (share's inverse)."""
    world_size = shard[1]
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


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


def check_same_run(saved, current, models_dir):
    differ = [f"{k}={saved[k]!r}, now {current[k]!r}" for k in saved.keys() & current.keys()
              if k not in RESUMABLE_CHANGES and saved[k] != current[k]]
    if differ:
        raise UserError(f"{models_dir} holds a run with other settings ({'; '.join(differ)}): pass another "
                        f"--run_name, or delete {models_dir} to start this one afresh")


# ---------------------------------------------------------------------------------------------------------------
# The model, the optimizer and the diffusion a configuration describes; loading a trained run
# ---------------------------------------------------------------------------------------------------------------

def make_model(config):
    """The UNet a configuration describes: conditional when config.num_classes is set."""
    shape = dict(width=config.width, attention=config.attention, norm_groups=config.norm_groups, film=config.film,
                 res_blocks=config.res_blocks, bottleneck_embedding=config.bottleneck_embedding)
    if config.num_classes:
        return UNet_conditional(config.channels, config.channels, num_classes=config.num_classes, **shape)
    return UNet(config.channels, config.channels, **shape)


def make_diffusion(config, device):
    from ddpm import Diffusion  # (ddpm.py imports this module to train)
    return Diffusion(config.noise_steps, config.beta_start, config.beta_end, config.img_size, device,
                     config.channels, config.schedule, config.prediction, config.loss_weighting, config.min_snr_gamma,
                     config.timesteps)


def make_optimizer(model, lr, device, kind="adamw"):
    """"adamw" (the tutorial's), as one fused kernel where torch has one (CUDA, CPU), else as foreach; or "muon":
    Muon for the hidden layers' weight matrices, AdamW for the rest (biases, norms, the input and output layers and
    the label embedding, as Jordan et al. keep them)."""
    if kind == "muon":
        outer = {"inc.double_conv.0.weight", "outc.weight", "label_emb.weight"}
        groups = {True: [], False: []}  # is it a hidden layer's weight matrix?
        for name, p in model.named_parameters():
            groups[p.ndim >= 2 and name not in outer].append(p)
        return Muon([{"params": groups[True], "muon": True}, {"params": groups[False], "muon": False}], lr)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=fused, foreach=not fused)


def orthogonalise(g, steps=5):
    """U V^T of g = U S V^T, approximately (its singular values brought to about 0.7 to 1.2), by the quintic
    Newton-Schulz iteration of Jordan et al. 2024: x <- p(a) x, a = x x^T, p(a) = 3.4445 - 4.7750 a + 2.0315 a^2.
    It runs on the Gram matrix of the short side (a <- p(a) a p(a), and q, the product of the p's) and multiplies
    by x once at the end: the same result, with two products with the wide x in all instead of two a step."""
    x = g / (g.norm() + 1e-7)  # all singular values <= 1
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    a = x @ x.T
    eye = torch.eye(len(a), dtype=a.dtype, device=a.device)
    q = eye
    for _ in range(steps):
        p = 3.4445 * eye - 4.7750 * a + 2.0315 * a @ a
        q, a = p @ q, p @ a @ p
    x = q @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for the parameter groups marked "muon": True, AdamW for those marked False, in one
    optimizer (one state to save and resume). A matrix's update is its Nesterov momentum orthogonalised (a
    convolution's weight seen as out x in*k*k), scaled to the RMS that AdamW's update has, 0.2 (Liu et al. 2025), so
    one LR serves both. The AdamW part has beta2 0.99 (torch's default: 0.999), as in the Muon runs of
    docs/measurements.md. (torch.optim.Muon takes 2-D parameters only, and orthogonalises in bf16, slow on CPUs
    without it.)"""

    def __init__(self, groups, lr, momentum=0.95, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01):
        super().__init__(groups, dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            for p in (p for p in group["params"] if p.grad is not None):
                state, grad = self.state[p], p.grad
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)  # Muon's momentum, or AdamW's first moment
                    if not group["muon"]:
                        state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
                if group["muon"]:
                    state["exp_avg"].lerp_(grad, 1 - group["momentum"])
                    update = orthogonalise(grad.lerp(state["exp_avg"], group["momentum"]).flatten(1))  # Nesterov
                    p.add_(update.reshape(p.shape), alpha=-lr * 0.2 * max(update.shape) ** 0.5)
                else:  # AdamW (Loshchilov & Hutter 2019)
                    step = state["step"].item()
                    state["exp_avg"].lerp_(grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denominator = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denominator, value=-lr / (1 - beta1 ** step))


def read_config(run):
    """The settings of a run (models/<run_name>, or a checkpoint file in it) from its config.json."""
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"no {path}: the training scripts write config.json beside their checkpoints; a checkpoint "
                        f"from elsewhere loads by hand (UNet_conditional(...).load_state_dict)")
    return argparse.Namespace(**{**EARLIER_DEFAULTS, **json.loads(path.read_text())})


def load_run(run, device=None):
    """(diffusion, model) of a trained run, ready to sample: `run` is its folder (models/<run_name>: the EMA weights)
    or one of its checkpoint files; the model predicts, and the diffusion samples, with the run's own settings."""
    config = read_config(run)
    weights = Path(run) / "ema_ckpt.pt" if Path(run).is_dir() else Path(run)
    diffusion = make_diffusion(config, pick_device(device))
    model = load_weights(make_model(config), weights).to(diffusion.device).eval()
    return diffusion, model


def cpu_state(model):
    return {k: v.cpu() for k, v in model.state_dict().items()}


def save_json(obj, path):
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


# ---------------------------------------------------------------------------------------------------------------
# Options: the scripts' UPPERCASE constants, each overridable on the command line
# ---------------------------------------------------------------------------------------------------------------

def parse_config(constants, argv=None, description=None):
    """Read a script's UPPERCASE constants, each overridable on the command line as --lower_case VALUE.

    VALUE is read as a Python literal (64, 3e-4, True, None, 64,128, "(4, 8)") or else as a plain string, and must
    have the type of the constant's default (a float option also takes an int); a constant whose default is None
    gets its type from its annotation (`NUM_IMAGES: int | None = None`). Returns the configuration as a namespace
    with lower-case names.
    """
    annotations = constants.get("__annotations__", {})
    defaults = {name.lower(): value for name, value in constants.items()
                if name.isupper() and isinstance(value, (bool, int, float, str, tuple, type(None)))}
    parser = argparse.ArgumentParser(description=description)
    for name, default in defaults.items():
        parser.add_argument("--" + name, default=None, metavar="VALUE", help=f"default: {default!r}")
    args = vars(parser.parse_args(argv))
    values = {name: default if args[name] is None else
              parse_value(name, args[name], default, annotations.get(name.upper()))
              for name, default in defaults.items()}
    return argparse.Namespace(**values)


def parse_value(name, text, default, annotation=None):
    """One option's value from its text, checked against its annotation's types, or else its default's type."""
    types = [t for t in typing.get_args(annotation) or (annotation,) if t is not type(None)] if annotation else \
        [type(default)]
    try:
        value = ast.literal_eval(text.capitalize() if text.lower() in ("true", "false", "none") else text)
    except (ValueError, SyntaxError):
        value = text
    if type(value) in types or (value is None and default is None) or types == [type(None)]:
        return value  # (a None default without an annotation takes any value)
    if float in types and type(value) is int:
        return float(value)  # --cfg_scale 7
    if tuple in types and type(value) is int:
        return (value,)  # --attention 8
    if tuple in types and text.strip() == "":
        return ()  # --attention= (none)
    if name == "img_size" and isinstance(value, tuple):
        return value  # (height, width)
    if str in types:
        return text
    names = " or ".join(t.__name__ for t in types)
    raise UserError(f"--{name} {text}: expected a value of type {names} (the default is {default!r})")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------------------------

def save_checkpoint(obj, path):
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def read_checkpoint(path):
    """torch.load(path) on the CPU, weights only, with a clear message when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here: a truncated zip, an old pickle, a foreign object
        raise UserError(f"cannot read checkpoint '{path}': {str(e).splitlines()[0]}") from None


def load_weights(model, path_or_state, name=None):
    """Load a state dict (or the file holding one) into model, naming the keys that differ if it does not fit.
    Prefixes added by torch.compile ("_orig_mod.") and DistributedDataParallel ("module.") are removed."""
    name = name or path_or_state
    state = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, Path)) else path_or_state
    if not isinstance(state, dict):
        raise UserError(f"checkpoint '{name}' holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shapes differ (checkpoint vs model)", shapes)):
        if keys:
            problems.append(f"{label}: {', '.join(keys[:4])}" + (f" and {len(keys) - 4} more" if len(keys) > 4 else ""))
    if problems:
        raise UserError(f"checkpoint '{name}' does not fit the model ({'; '.join(problems)}): was it trained with "
                        f"other WIDTH, ATTENTION, CHANNELS, NUM_CLASSES?")
    model.load_state_dict(state)
    return model
