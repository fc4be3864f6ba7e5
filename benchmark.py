"""How fast do we train and sample, against what this machine's matrix units can do?

    python benchmark.py                                        # the tutorial-size conditional UNet, 32x32, batch 32
    python benchmark.py --img_size 64 --batch_size 128 --compile --json out.json

Measured in one process, warm-up excluded, device-synchronised, the median of several timed repeats:
  - training images/s: the very step the training scripts run (their train_step: forward, backward, AdamW, EMA);
  - the model's FLOPs per training image (torch.utils.flop_counter), and utilisation: the FLOP/s achieved divided by
    the FLOP/s of a large matrix product in the same dtype, measured here and now;
  - sampling images/s: DDIM 50 steps with classifier-free guidance (one batched pass per step), and the ancestral
    1000-step sampler, both as the scripts sample; and the tutorial's way, ancestral with two separate forward
    passes per step in fp32. A sampler step costs the same whatever the number of steps, so each figure comes from
    timing a few steps: the whole benchmark takes a minute or two even on a slow CPU;
  - peak memory of training and sampling (the GPU's allocator; on a CPU the process's peak resident size).
In fp32 on CUDA, matrix products and convolutions alike use TF32 (convolutions do by default in PyTorch; the
training scripts turn it on for matrix products too), so the utilisation compares like with like.
"""
import argparse
import copy
import json
import resource
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import (FlopCounterMode, flop_registry, register_flop_formula, sdpa_backward_flop_count,
                                      sdpa_flop_count)

import ddpm
import ddpm_conditional
from data import UserError
from ddpm import Diffusion, make_diffusion, make_model
from importance import ImportanceSampler
from modules import EMA
from optimizers import make_optimizer
from utils import amp_dtype, autocast, bf16_supported, pick_device


def count_cpu_attention_flops():
    """torch 2.14 counts the FLOPs of its GPU attention kernels but not of the CPU one (later versions do): count it
    the same way (the backward recomputes the attention scores, as torch counts it for the GPU kernels)."""
    aten = torch.ops.aten
    formulas = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
    }
    for op, formula in formulas.items():
        if op not in flop_registry:
            register_flop_formula(op)(formula)


count_cpu_attention_flops()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device, repeats, warmup=2, budget_s=float("inf")):
    """Median seconds of `repeats` calls of fn, after `warmup` untimed ones; fewer (at least one) once the timed
    calls have taken budget_s seconds."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_tflops(device, dtype, repeats=5, n=None):
    """TFLOP/s of a large square (n x n) matrix product: the practical peak of the matrix units."""
    n = n or (8192 if device.type == "cuda" else 4096)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeats) / 1e12


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux reports KiB


class TwoPasses(torch.nn.Module):
    """The model as the tutorial guides it: the conditional and the unconditional pass one after the other (Diffusion
    batches them as one pass)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.num_classes = model, model.num_classes

    def forward(self, x, t, labels):
        return torch.cat([self.model(*part) for part in zip(x.chunk(2), t.chunk(2), labels.chunk(2))])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--width", type=int, default=64, help="64: the tutorial's UNet")
    parser.add_argument("--attention", default="1,2,4,8", help="downsampling factors with self-attention")
    parser.add_argument("--norm_groups", type=int, default=1, help="GroupNorm groups (1: the tutorial's)")
    parser.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw", help="adamw: the tutorial's")
    parser.add_argument("--film", action=argparse.BooleanOptionalAction, default=False,
                        help="the embedding as a scale and shift (off: the tutorial's addition)")
    parser.add_argument("--timesteps", choices=("uniform", "logit_normal", "importance"), default="uniform",
                        help="how training draws t (uniform: the tutorial's)")
    parser.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                        help="bf16 / fp16: autocast (fp16 with a GradScaler); default: what the scripts' AMP picks")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=False,
                        help="the model and its inputs in channels-last memory format (the scripts: off)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (the median is reported)")
    parser.add_argument("--sample_repeats", type=int, default=3, help="timed repeats of each sampler (fewer after 8 s)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    try:
        report = benchmark(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def benchmark(args):
    device = pick_device(args.device)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    args.dtype = args.dtype or next(k for k, v in dtypes.items() if v == amp_dtype(device))  # as the scripts' AMP
    if args.dtype == "bf16" and not bf16_supported(device):
        raise UserError(f"{device} has no native bf16 here: use --dtype fp32 (or fp16 on a CUDA GPU)")
    amp = dtypes[args.dtype]
    dtype = amp or torch.float32
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    if device.type == "cuda":  # one precision for the model's products and the matmul peak
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.img_size % 8:
        raise UserError(f"img_size={args.img_size}: must be divisible by 8")
    attention = tuple(int(a) for a in args.attention.split(",") if a)
    config = argparse.Namespace(  # what the scripts would build with these options (the tutorial's objective)
        channels=args.channels, num_classes=args.num_classes if args.conditional else None, width=args.width,
        attention=attention, img_size=args.img_size, schedule="linear", prediction="eps", loss_weighting="none",
        cfg_drop=0.1, ema_start=0, flip=True, norm_groups=args.norm_groups, film=args.film, timesteps=args.timesteps,
        grad_accum=1)
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    model = make_model(config).to(device, memory_format=memory_format)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    ema = EMA(0.995)
    optimizer = make_optimizer(model, 3e-4, device, args.optimizer)
    diffusion = make_diffusion(config, device)
    importance = ImportanceSampler(diffusion.noise_steps, device) if args.timesteps == "importance" else None
    train_model = torch.compile(model) if args.compile else model
    generator = torch.Generator(device).manual_seed(0)
    n = args.batch_size
    images = torch.randint(0, 256, (n, args.channels, args.img_size, args.img_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, args.num_classes, (n,), device=device) if args.conditional else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        if args.conditional:
            ddpm_conditional.train_step(train_model, ema_model, ema, optimizer, diffusion, images, labels, generator,
                                        config, amp, scaler, importance)
        else:
            ddpm.train_step(train_model, ema_model, ema, optimizer, diffusion, images, generator, config, amp, scaler,
                            importance)

    with FlopCounterMode(display=False) as flops:  # forward and backward of one step (matmuls, convolutions, attention)
        step()
    gflop_per_image = flops.get_total_flops() / n / 1e9
    train_seconds = timed(step, device, args.steps, warmup=2)
    train_images_per_s = n / train_seconds

    sample_labels = labels
    few = 3  # sampler steps timed: a step costs the same whatever the number of steps
    short = Diffusion(few, img_size=args.img_size, device=device, channels=args.channels)

    def ddim_few():
        with autocast(device, amp):
            diffusion.sample(ema_model, n, sample_labels, cfg_scale=3, steps=few, progress=False)

    def ancestral_few():
        with autocast(device, amp):
            short.sample(ema_model, n, sample_labels, cfg_scale=3, steps=None, progress=False)

    def tutorial_few():  # Diffusion's ancestral step, in fp32, with two passes
        short.sample(TwoPasses(ema_model), n, sample_labels, cfg_scale=3, steps=None, progress=False)

    def seconds_per_step(sampler):
        return timed(sampler, device, args.sample_repeats, warmup=1, budget_s=8) / few

    report = {
        "device": describe(device), "dtype": args.dtype, "img_size": args.img_size, "batch_size": n,
        "params": sum(p.numel() for p in model.parameters()),
        "train": {"images_per_s": train_images_per_s, "gflop_per_image": gflop_per_image},
        "sample": {"ddim50_cfg_images_per_s": n / (50 * seconds_per_step(ddim_few)),
                   "ancestral_images_per_s": n / (1000 * seconds_per_step(ancestral_few))},
    }
    if args.conditional:
        report["sample"]["tutorial_ancestral_fp32_images_per_s"] = n / (1000 * seconds_per_step(tutorial_few))
    report["peak_memory_mb"] = peak_memory_mb(device)  # before the matmul test allocates its matrices
    report["matmul_tflops"] = matmul_tflops(device, dtype)
    report["train"]["utilisation"] = gflop_per_image * train_images_per_s / 1000 / report["matmul_tflops"]
    report["options"] = {"width": args.width, "attention": list(attention), "conditional": args.conditional,
                         "channels_last": args.channels_last, "compile": args.compile}
    return report


def describe(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return str(device)


def print_table(r):
    train, sample = r["train"], r["sample"]
    tf32 = " (TF32 matmul and convolutions)" if r["dtype"] == "fp32" and not r["device"].startswith("cpu") else ""
    rows = [
        ("device", r["device"]), ("dtype", r["dtype"] + tf32),
        ("image size, batch", f"{r['img_size']}, {r['batch_size']}"),
        ("parameters", f"{r['params']:,}"),
        ("train images/s", f"{train['images_per_s']:.1f}"), ("train GFLOP/image", f"{train['gflop_per_image']:.2f}"),
        ("matmul TFLOP/s", f"{r['matmul_tflops']:.2f}"), ("utilisation", f"{train['utilisation']:.2f}"),
        ("sample images/s, DDIM-50 + CFG", f"{sample['ddim50_cfg_images_per_s']:.2f}"),
        ("sample images/s, ancestral 1000 + CFG", f"{sample['ancestral_images_per_s']:.3f}"),
    ]
    if "tutorial_ancestral_fp32_images_per_s" in sample:
        tutorial = sample["tutorial_ancestral_fp32_images_per_s"]
        rows.append(("sample images/s, tutorial's ancestral (fp32, 2 passes)", f"{tutorial:.3f}"))
        speed_up = sample["ddim50_cfg_images_per_s"] / tutorial
        rows.append(("DDIM-50 + CFG speed-up over the tutorial's", f"{speed_up:.0f}x"))
    rows.append(("peak memory MB", f"{r['peak_memory_mb']:.0f}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
