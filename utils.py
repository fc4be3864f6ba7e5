"""What both training scripts share: devices and precision, the loop's helpers, torchrun, sampling's inputs and
outputs, images and plots. Elsewhere: the datasets and get_data (data.py), checkpoints.py, options.py."""
import contextlib
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from tqdm import tqdm

from data import UserError, get_data  # noqa: F401 (the tutorial's utils.get_data)
from modules import UNet, UNet_conditional


# --- device and precision ---

def pick_device(name=None):
    """'auto' (or None): CUDA, else Apple MPS, else the CPU. Any other name must be available here."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        if nvidia_gpu_present():
            warn_unusable_gpu()
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}': expected auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise UserError(f"device '{name}' is not available on this machine: use --device auto or cpu")
    return device


def nvidia_gpu_present():
    """An NVIDIA GPU with its driver loaded (Linux: its /proc entry; Windows: nvidia-smi), usable by torch or not."""
    return Path("/proc/driver/nvidia/version").exists() or (os.name == "nt" and shutil.which("nvidia-smi") is not None)


def warn_unusable_gpu():
    """Said loudly, once: an NVIDIA GPU that this torch cannot use (a CPU build, or a CUDA build newer than the
    driver), so that nobody trains on the CPU by mistake."""
    if not getattr(warn_unusable_gpu, "said", False):
        warn_unusable_gpu.said = True
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"WARNING: this machine has an NVIDIA GPU, but torch {torch.__version__} ({build}) cannot use it, so "
              f"this runs on the CPU. `nvidia-smi` shows the newest CUDA the driver supports; install the torch built "
              f"for it, e.g. `pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126` "
              f"(cu118, cu121, cu124, cu126, cu128: see pytorch.org/get-started), or update the driver.",
              file=sys.stderr)


def grad_scaler(device, amp):
    """float16's loss scaler (else None); refused on Apple MPS: torch's GradScaler needs float64, which MPS lacks."""
    if amp != torch.float16:
        return None
    if device.type == "mps":
        raise UserError("--amp fp16 on Apple MPS: torch's loss scaler cannot run there; use --amp False (fp32)")
    return torch.amp.GradScaler(device.type)


def check_attention_memory(device, c, budget_gib=8):
    """Apple MPS's attention backward holds each head's (S x S) scores (CUDA's and CPUs' fused kernels never do):
    refuse a setting that needs more than budget_gib for them in one micro-batch, saying what to change."""
    if device.type != "mps" or not c.attention:
        return
    height, width = (c.img_size, c.img_size) if isinstance(c.img_size, int) else c.img_size
    positions = height * width // min(c.attention) ** 2
    need = 2 * c.batch_size * 4 * positions ** 2 * 4 / 2 ** 30  # a micro-batch's scores and their gradient, 4 heads
    if need > budget_gib:
        raise UserError(f"on Apple MPS, attention at 1/{min(c.attention)} resolution ({positions} positions) needs "
                        f"about {need:.0f} GiB for a micro-batch of {c.batch_size}: use a smaller --batch_size (and "
                        f"--grad_accum to keep the images a step), or --attention without {min(c.attention)}")


def bf16_supported(device):
    """Whether this device computes in bfloat16 natively: CUDA GPUs from Ampere on (a T4, V100 or P100 only emulates
    it, slowly), CPUs with AVX512-BF16 or AMX; not Apple MPS, where it is not dependable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        if hasattr(torch.cpu, "get_capabilities"):  # torch 2.11 and later
            capabilities = torch.cpu.get_capabilities()
            return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def amp_dtype(device, amp=True):
    """amp True: bfloat16 where native, float16 on CUDA GPUs without it (T4, V100, P100: training needs a GradScaler),
    else None (fp32); False: None; "bf16" or "fp16": that dtype (e.g. to try fp16 on Apple MPS)."""
    device = torch.device(device)
    if amp not in (True, False, "bf16", "fp16"):
        raise UserError(f"amp={amp!r}: expected True (automatic), False, 'bf16' or 'fp16'")
    if amp in ("bf16", "fp16"):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    elif amp and bf16_supported(device):
        dtype = torch.bfloat16
    else:
        dtype = torch.float16 if amp and device.type == "cuda" else None
    if dtype is not None and not autocast_runs(device, dtype):  # what the log says is what runs
        print(f"warning: torch {torch.__version__} has no {str(dtype)[6:]} autocast on {device.type}: fp32",
              file=sys.stderr)
        return None
    return dtype


def autocast(device, amp_dtype):
    """None: no autocast at all (torch 2.5 on Apple MPS warns about an fp32 autocast even when it is disabled)."""
    return contextlib.nullcontext() if amp_dtype is None else torch.autocast(torch.device(device).type, amp_dtype)


def autocast_runs(device, dtype):
    """Whether autocast to dtype really runs: torch warns and disables one it lacks (bf16 on MPS before torch 2.6)."""
    device = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device.type, dtype=dtype):
            return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == dtype


# --- the loop's helpers: the loss log, the learning rate, the loss readout, Ctrl-C ---

def make_logger(kind, run_name, config):
    """log(step, scalars, images=None): scalars and a uint8 sample grid to TensorBoard (runs/<run_name>/, as the
    tutorial) or Weights & Biases (WANDB_MODE=offline too); kind None: nowhere. Neither package is needed otherwise."""
    if kind is None:
        return lambda step, scalars, images=None: None
    if kind not in ("tensorboard", "wandb"):
        raise UserError(f"logger={kind!r}: expected None, 'tensorboard' or 'wandb'")
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(Path("runs") / run_name)

            def log(step, scalars, images=None):
                for name, value in scalars.items():
                    writer.add_scalar(name, value, step)
                if images is not None:
                    writer.add_image("samples", torchvision.utils.make_grid(images.cpu()), step)
                writer.flush()
            return log
        import wandb
    except ImportError:
        raise UserError(f"logger='{kind}' needs the {kind} package: pip install {kind}") from None
    wandb.init(project="ddpm", name=run_name, config=config, dir=".")  # (a resumed run: a new W&B run, same name)
    return lambda step, scalars, images=None: wandb.log(
        {**scalars, **({"samples": wandb.Image(grid_image(images))} if images is not None else {})}, step=step)


def learning_rate(c, step, steps_per_epoch):
    """LR after a linear warm-up over LR_WARMUP steps, then constant, or cosine-decayed to 0 at the run's last step
    (Loshchilov & Hutter 2017): a function of the step alone, so a resumed run goes on the same curve."""
    if step < c.lr_warmup:
        return c.lr * (step + 1) / c.lr_warmup
    if c.lr_schedule == "constant":
        return c.lr
    progress = min(1.0, (step - c.lr_warmup) / max(1, c.epochs * steps_per_epoch - c.lr_warmup))
    return c.lr * (0.5 * (1 + math.cos(math.pi * progress)))


def time_left(started, steps_done, steps_left):
    """The run's time left (h:mm:ss) at its pace since `started`, this process's first step (the grids count)."""
    return tqdm.format_interval((time.perf_counter() - started) / max(1, steps_done) * steps_left)


def mean_loss(total, steps, world_size, step, models_dir):
    """Mean of `steps` losses summed on the device (reading waits for it), over all ranks so that all stop alike."""
    if world_size > 1:
        dist.all_reduce(total)
        total /= world_size
    loss = total.item() / steps
    if not math.isfinite(loss):
        raise UserError(f"the loss became {loss} by step {step}: training stopped, and the last good checkpoint in "
                        f"{models_dir} is kept (try a lower --lr, or --amp False)")
    return loss


@contextlib.contextmanager
def save_and_stop_on_ctrl_c(models_dir, enabled=True):
    """Yields interrupted(): whether Ctrl-C was pressed, so the loop saves at the next step and stops; a second stops at
    once. Under torchrun (enabled False) Ctrl-C stops at once: the processes would not stop at the same step."""
    pressed = []

    def handler(signum, frame):
        pressed.append(signum)
        print("\nCtrl-C: saving after this step, then stopping (Ctrl-C again stops at once)", file=sys.stderr,
              flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        previous = signal.signal(signal.SIGINT, handler) if enabled else None
    except ValueError:  # not the main thread: Ctrl-C stops at once
        previous = None
    try:
        yield lambda: bool(pressed)
    except KeyboardInterrupt:
        if (Path(models_dir) / "train_state.pt").exists():
            sys.exit(f"stopped at once: the last checkpoint in {models_dir} is kept; run the same command to resume")
        sys.exit("stopped at once, before the first checkpoint: nothing was saved")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# --- torchrun: one process per GPU (or CPU process), each with its slice of every global batch ---

@contextlib.contextmanager
def distributed(device):
    """(device, rank, world_size). Under torchrun (with one process too) it joins the process group, NCCL on CUDA (one
    GPU per process, LOCAL_RANK) or gloo on the CPU, and leaves it at the end; a plain `python` run is rank 0 of 1."""
    device = pick_device(device)
    if "LOCAL_RANK" not in os.environ:  # not started by torchrun
        yield device, 0, 1
        return
    if device.type == "cuda":  # NCCL, bound to this process's GPU
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise UserError(f"torchrun: distributed training runs on CUDA (NCCL) or the CPU (gloo), not on {device}")
    try:
        yield device, dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def local_rank_zero_first():
    """Under torchrun a block that prepares files (a download) runs in three turns: rank 0, then each other machine's
    first process (which finds the files on a shared filesystem, else fetches its own), then the rest."""
    if not dist.is_initialized():
        yield
        return
    turn = 0 if dist.get_rank() == 0 else 1 if int(os.environ.get("LOCAL_RANK", 0)) == 0 else 2
    for i in range(3):
        if i == turn:
            yield
        dist.barrier()


def no_sync(model, last_micro_batch):
    """DDP: GRAD_ACCUM's micro-batches before the last add their gradients locally: same result, fewer all-reduces."""
    ddp = getattr(model, "_orig_mod", model)  # (torch.compile wraps the DDP model)
    if last_micro_batch or not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def all_gather(x, world_size):
    """The whole global batch's values from every process's slice of them, in rank order."""
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# --- sampling: images in and out, labels checked ---

def to_images(x):
    """Floats in [-1, 1] -> uint8 images in [0, 255], rounded."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_images(images, shape, device):
    """uint8 images (n, *shape), as Diffusion.sample returns them -> floats in [-1, 1] on the device."""
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise UserError(f"images of shape {tuple(images.shape)} and dtype {images.dtype}: expected uint8 "
                        f"(n, {', '.join(map(str, shape))}), as sample returns them")
    return images.to(device).float() / 127.5 - 1


def check_labels(model, labels, n, device):
    """labels as a tensor on the device, checked against the model and the number of images."""
    if labels is None:
        return None
    labels, num_classes = torch.as_tensor(labels, device=device), getattr(model, "num_classes", None)
    if isinstance(model, UNet) and not isinstance(model, UNet_conditional):
        raise UserError("labels given to an unconditional model (a UNet): sample it with labels=None")
    if labels.is_floating_point():
        if labels.shape != (n, num_classes or labels.shape[-1]):
            raise UserError(f"multi-hot labels of shape {tuple(labels.shape)}: expected ({n}, {num_classes})")
    elif labels.shape != (n,):
        raise UserError(f"labels of shape {tuple(labels.shape)}: expected one class index per image, ({n},)")
    elif num_classes is not None and len(labels) and labels.max() >= num_classes:
        raise UserError(f"label {labels.max().item()} is outside the model's {num_classes} classes "
                        f"(0 .. {num_classes - 1})")
    elif len(labels) and labels.min() < -1:
        raise UserError(f"label {labels.min().item()}: expected a class index, or -1 for none")
    return labels


def check_cfg_scale(cfg_scale):
    """The guidance scale: 0 or more (0 and 1: the conditional model; below 0 would push away from the labels)."""
    if not isinstance(cfg_scale, (int, float)) or cfg_scale < 0:
        raise UserError(f"cfg_scale={cfg_scale!r}: expected 0 or more (1: conditional, above 1: guided)")


# --- images, plots, files ---

def setup_logging(run_name):
    """models/<run_name> (checkpoints) and results/<run_name> (grids, loss curve), made at their first file."""
    if not run_name or Path(run_name).is_absolute() or ".." in Path(run_name).parts or Path(run_name) == Path("."):
        raise UserError(f"run_name={run_name!r}: expected a name for the run's folders in models/ and results/")
    return Path("models") / run_name, Path("results") / run_name


def plot_images(images, nrow=8, path=None):
    """Show uint8 images (n, C, H, W) as a grid; with no display, save it to `path` (None: samples_1.png, ...)."""
    import matplotlib
    import matplotlib.pyplot as plt
    grid = torchvision.utils.make_grid(images.cpu(), nrow=nrow)
    figure = plt.figure(figsize=(min(16, grid.shape[2] / 32), min(16, grid.shape[1] / 32)))
    plt.imshow(grid.permute(1, 2, 0).numpy())
    plt.axis("off")
    if matplotlib.get_backend().lower() in ("agg", "pdf", "ps", "svg", "cairo", "template"):  # shows nothing
        plot_images.saved = getattr(plot_images, "saved", 0) + 1
        path = path or f"samples_{plot_images.saved}.png"
        save_images(images, path, nrow)
        print(f"no display here: the images are in {Path(path).resolve()}")
    else:
        plt.show()
    plt.close(figure)  # (a figure left open is held in memory: matplotlib warns after 20)


def grid_image(images, nrow=8):
    """uint8 images (n, C, H, W) as one PIL image, a grid of nrow images a row."""
    return Image.fromarray(torchvision.utils.make_grid(images.cpu(), nrow=nrow).permute(1, 2, 0).numpy())


def save_images(images, path, nrow=8):
    """Save uint8 images (n, C, H, W) as one grid image, in the format of the file's extension."""
    image, suffix = grid_image(images, nrow), Path(path).suffix.lower()
    if suffix not in Image.registered_extensions():
        raise UserError(f"'{path}': name the image file with an extension, e.g. .png or .jpg")
    replace_atomically(path, lambda tmp: image.save(tmp, format=Image.registered_extensions()[suffix]))


def save_gif(frames, path, ms_per_frame=200, hold_last_ms=2000):
    """An animated GIF of PIL images, looping, the last one held longer."""
    durations = [ms_per_frame] * (len(frames) - 1) + [hold_last_ms]
    replace_atomically(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                        duration=durations, loop=0))


def save_frames_gif(frames, path, nrow=8):
    """The frames of sample(..., frames_every=k), each a batch of uint8 images, as an animated GIF of grids."""
    save_gif([grid_image(images, nrow) for images in frames], path)


def save_progress_gif(results_dir, epochs):
    """results/<run>/progress.gif: the sample grids of epochs 1 .. `epochs` (1.jpg, 2.jpg, ...) in order."""
    frames = [Image.open(p) for p in (Path(results_dir) / f"{e}.jpg" for e in range(1, epochs + 1)) if p.exists()]
    if frames:
        save_gif(frames, Path(results_dir) / "progress.gif")


def save_loss_plot(losses, path):
    """losses: (step, mean loss) pairs; returns the figure."""
    from matplotlib.figure import Figure  # no pyplot: nothing is shown, no display needed
    fig = Figure(figsize=(6, 4), layout="constrained")  # room for the labels, however wide the ticks
    ax = fig.add_subplot()
    if losses:
        ax.plot(*zip(*losses))
    ax.set(xlabel="step", ylabel="loss (weighted as trained, e.g. min-SNR)", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return fig


def replace_atomically(path, write):
    """write(a temp file beside `path`), then rename it over `path`: a kill leaves the old or new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
