"""benchmark.py: the FLOPs it counts against closed forms, and the figures it writes."""
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import benchmark


def test_cpu_attention_flops_match_the_closed_form():
    """Torch counts its GPU attention kernels only; benchmark.py counts the CPU kernel the same way."""
    b, h, n, d = 2, 4, 64, 16
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as forward:
        out = F.scaled_dot_product_attention(q, k, v)
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    matmul = 2 * b * h * n * n * d  # one (n x d) @ (d x n) or (n x n) @ (n x d) product per head: 2 n^2 d FLOPs
    assert forward.get_total_flops() == 2 * matmul  # Q K^T, then P V
    assert backward.get_total_flops() == 5 * matmul  # Q K^T again, then dP = dO V^T, dV, dQ and dK


def run(tmp_path, monkeypatch, *options):
    # the peak from a 512 x 512 product: the formulas are the same, in a fraction of the 4096 x 4096 product's time
    monkeypatch.setattr(benchmark, "matmul_tflops", functools.partial(benchmark.matmul_tflops, n=512))
    out = tmp_path / "out.json"
    benchmark.main(["--img_size", "8", "--width", "8", "--batch_size", "4", "--dtype", "fp32", "--steps", "1",
                    "--sample_repeats", "1", "--device", "cpu", "--json", str(out), *options])  # the CPU's kernels
    return json.loads(out.read_text())


def test_figures_and_the_flops_of_one_attention_block(tmp_path, monkeypatch, auto_is_not_the_cpu):
    r = run(tmp_path, monkeypatch, "--attention", "1")
    without = run(tmp_path, monkeypatch, "--attention=")
    assert {k: type(v) for k, v in r.items() if k not in ("train", "sample", "options")} == {
        "device": str, "dtype": str, "img_size": int, "batch_size": int, "params": int, "matmul_tflops": float,
        "peak_memory_mb": float}
    assert (r["dtype"], r["img_size"], r["batch_size"]) == ("fp32", 8, 4)
    assert {"images_per_s", "gflop_per_image", "utilisation"} <= set(r["train"])
    assert {"ddim50_cfg_images_per_s", "ancestral_images_per_s"} <= set(r["sample"])
    assert all(v > 0 for v in [*r["train"].values(), *r["sample"].values(), r["matmul_tflops"]])
    train = r["train"]
    assert train["utilisation"] == pytest.approx(
        train["gflop_per_image"] * 1e9 * train["images_per_s"] / (r["matmul_tflops"] * 1e12))
    # The one attention block (sa6, full resolution: N = 64 positions of C = 8 channels) adds, per training image,
    # its 6 C x C weight matrices (in_proj 3, out_proj 1, feed-forward 2): 2 N C^2 FLOPs each forward, twice that
    # backward (input and weight gradients), and attention itself: 4 N^2 C forward, 10 N^2 C backward (above).
    n, c = 64, 8
    expected = 6 * 3 * 2 * n * c * c + 14 * n * n * c
    assert (train["gflop_per_image"] - without["train"]["gflop_per_image"]) * 1e9 == pytest.approx(expected)
    # 6 weight matrices, their biases, 2 LayerNorms
    assert r["params"] - without["params"] == 6 * c * c + 6 * c + 2 * 2 * c
