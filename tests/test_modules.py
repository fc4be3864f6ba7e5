"""The UNet: the tutorial's keys and function, any size and channel count, attention through SDPA, and EMA."""
import copy
import math
import zlib
from pathlib import Path

import pytest
import torch

from modules import EMA, DoubleConv, Down, SelfAttention, UNet, UNet_conditional

REFERENCE = Path(__file__).parent / "reference"


def reference_weights(keys):
    """The deterministic weights of tests/reference/README.md, one tensor per (key, shape)."""
    state = {}
    for key, shape in keys:
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        r = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) >= 2:
            w = r / math.sqrt(math.prod(shape) / shape[0])
        elif key.endswith("weight"):
            w = 1 + 0.1 * r
        else:
            w = 0.1 * r
        state[key] = w.float()
    return state


def relative_error(ours, reference):
    return ((ours - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("name", ["uncond64", "cond64"])
def test_default_models_have_the_tutorials_keys_in_order(name):
    lines = (REFERENCE / f"tutorial_{name}_keys.txt").read_text().splitlines()
    expected = [(key, tuple(int(d) for d in shape.strip("()").split(",") if d.strip()))
                for key, shape in (line.split("\t") for line in lines)]
    model = UNet_conditional(num_classes=10) if name == "cond64" else UNet()
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected


def test_unconditional_model_computes_the_tutorials_function():
    ref = torch.load(REFERENCE / "tutorial_uncond64.pt", weights_only=True)
    model = UNet().eval()
    model.load_state_dict(reference_weights(ref["keys"]))
    with torch.no_grad():
        assert relative_error(model(ref["x"], ref["t"]), ref["out"]) < 1e-4


def test_conditional_model_computes_the_tutorials_function():
    ref = torch.load(REFERENCE / "tutorial_cond64.pt", weights_only=True)
    model = UNet_conditional(num_classes=10).eval()
    model.load_state_dict(reference_weights(ref["keys"]))
    with torch.no_grad():
        assert relative_error(model(ref["x"], ref["t"], ref["y"]), ref["out"]) < 1e-4
        assert relative_error(model(ref["x"], ref["t"], None), ref["out_uncond"]) < 1e-4
        # a negative label is the null condition, per sample: the same as no label
        assert relative_error(model(ref["x"], ref["t"], torch.full((4,), -1)), ref["out_uncond"]) < 1e-4


@pytest.mark.parametrize("size,channels", [(32, 3), (48, 1), (64, 3), (128, 1), ((64, 128), 3), ((24, 40), 1)])
def test_unet_any_size_and_channel_count(size, channels):
    h, w = (size, size) if isinstance(size, int) else size
    model = UNet_conditional(channels, channels, num_classes=3, width=8, attention=(1, 2, 4, 8))
    x = torch.randn(2, channels, h, w)
    out = model(x, torch.tensor([3, 900]), torch.tensor([0, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_impossible_sizes_are_clear_errors():
    model = UNet(width=8)
    with pytest.raises(ValueError, match=r"image size 28x28: .*divisible by 8"):
        model(torch.randn(1, 3, 28, 28), torch.tensor([1]))
    with pytest.raises(ValueError, match="multiple of 4"):
        UNet(width=10)
    with pytest.raises(ValueError, match="among 1, 2, 4, 8"):
        UNet(attention=(16,))


def test_width_and_attention_constants_shape_the_model():
    model = UNet(width=16, attention=(4, 8))
    keys = model.state_dict().keys()
    assert {k.split(".")[0] for k in keys if ".mha." in k} == {"sa2", "sa3", "sa4"}  # the 1/4 and 1/8 blocks
    assert model.inc.double_conv[0].weight.shape[0] == 16 and model.bot1.double_conv[0].weight.shape[0] == 128
    assert not any(".mha." in k for k in UNet(width=8, attention=()).state_dict())


def test_self_attention_matches_torch_multihead_attention():
    """SDPA on nn.MultiheadAttention's own parameters gives what the tutorial's mha(x, x, x) gave."""
    torch.manual_seed(0)
    block = SelfAttention(32).eval()
    x = torch.randn(2, 32, 6, 10)
    with torch.no_grad():
        seq = x.flatten(2).transpose(1, 2)
        normed = block.ln(seq)
        attended = block.mha(normed, normed, normed)[0] + seq
        expected = (block.ff_self(attended) + attended).transpose(1, 2).reshape(x.shape)
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_self_attention_trains_in_bf16_as_in_fp32():
    """With gradients on a CPU, the attention runs in fp32 inside a bf16 model: the output and the input's gradient
    match fp32 within bf16 rounding, under autocast and for a model cast to bf16 alike, and keep the input's dtype."""
    torch.manual_seed(0)
    block = SelfAttention(32)
    x, grad = torch.randn(2, 32, 16, 16, requires_grad=True), torch.randn(2, 32, 16, 16)
    reference = block(x)
    reference.backward(grad)
    reference_grad, x.grad = x.grad, None

    def relative_error(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = block(x)
    output.backward(grad)
    assert relative_error(output, reference) < 8 * 2 ** -8 and relative_error(x.grad, reference_grad) < 8 * 2 ** -8
    x_bf16 = x.detach().bfloat16().requires_grad_()
    output = copy.deepcopy(block).bfloat16()(x_bf16)
    output.backward(grad.bfloat16())
    assert output.dtype == x_bf16.grad.dtype == torch.bfloat16
    assert relative_error(output, reference) < 8 * 2 ** -8 and relative_error(x_bf16.grad, reference_grad) < 8 * 2 ** -8


def test_multi_hot_labels_embed_as_the_sum_of_their_classes():
    torch.manual_seed(0)
    model = UNet_conditional(num_classes=4, width=8).eval()
    table = model.label_emb.weight
    embedding = model.label_embedding(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(embedding[0], table[0] + table[2], atol=1e-6) and (embedding[1] == 0).all()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 10])
    with torch.no_grad():  # a one-hot vector is the same condition as its class index
        assert torch.allclose(model(x, t, torch.eye(4)[[1, 3]]), model(x, t, torch.tensor([1, 3])), atol=1e-5)


def test_ema_copies_during_warm_up_then_averages():
    model, ema_model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema = EMA(0.9)
    for _ in range(3):  # warm-up: a plain copy, whatever the EMA weights were
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.step_ema(ema_model, model, step_start_ema=3)
        assert torch.equal(ema_model.weight, model.weight)
    before, new = ema_model.weight.clone(), model.weight + 5.0
    with torch.no_grad():
        model.weight.copy_(new)
    ema.step_ema(ema_model, model, step_start_ema=3)
    assert torch.allclose(ema_model.weight, 0.9 * before + 0.1 * new)
    assert ema.step == 4


def test_norm_groups_normalise_each_group_and_keep_the_keys():
    """NORM_GROUPS: GroupNorm over that many channel groups (the tutorial's 1 normalises all channels together); the
    state-dict keys and shapes stay the tutorial's."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8) * torch.tensor([1.0, 5.0, 0.2, 3.0])[:, None, None] + 2
    for groups in (1, 2):
        with torch.no_grad():
            out = DoubleConv(4, 8, groups=groups)(x).view(3, groups, -1)  # the last GroupNorm's output
        assert torch.allclose(out.mean(-1), torch.zeros(3, groups), atol=1e-5)
        assert torch.allclose(out.var(-1, unbiased=False), torch.ones(3, groups), atol=1e-3)
    with torch.no_grad():
        halves = DoubleConv(4, 8, groups=1)(x).view(3, 2, -1).mean(-1)
    assert halves.abs().max() > 0.05  # with one group, each half of the channels is not normalised on its own
    grouped, tutorial = UNet(width=16, norm_groups=8).state_dict(), UNet(width=16).state_dict()
    assert [(k, v.shape) for k, v in grouped.items()] == [(k, v.shape) for k, v in tutorial.items()]
    with pytest.raises(ValueError, match="norm_groups=3: must divide width=16"):
        UNet(width=16, norm_groups=3)


def test_film_scales_and_shifts_by_the_embedding():
    """FILM: a Down block's output is x (1 + scale) + shift, scale and shift the halves of its projected embedding;
    without it the embedding is added (the tutorial's, with its keys and shapes)."""
    torch.manual_seed(0)
    block, x, emb = Down(8, 16, emb_dim=32, film=True), torch.randn(2, 8, 16, 16), torch.randn(2, 32)
    with torch.no_grad():
        features = block.maxpool_conv(x)
        scale, shift = block.emb_layer(emb)[:, :, None, None].chunk(2, dim=1)
        assert torch.allclose(block(x, emb), features * (1 + scale) + shift, atol=1e-6)
    assert block.emb_layer[1].weight.shape == (32, 32) and Down(8, 16, emb_dim=32).emb_layer[1].weight.shape == (16, 32)
    assert UNet(width=16, film=True).state_dict().keys() == UNet(width=16).state_dict().keys()


def test_attention_in_chunks_is_the_same_attention():
    """On Apple MPS the sampler's attention runs a few images at a time (its kernel holds every score): the result is
    scaled_dot_product_attention's on the whole batch, here with chunks of 3 images of (4 heads, 64 positions)."""
    import torch.nn.functional as F
    from modules import attention_in_chunks
    q, k, v = torch.randn(3, 10, 4, 64, 8).unbind(0)
    chunked = attention_in_chunks(q, k, v, max_bytes=3 * 4 * 64 * 64 * 4)
    torch.testing.assert_close(chunked, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-6)
    assert attention_in_chunks(q[:1], k[:1], v[:1], max_bytes=1).shape == (1, 4, 64, 8)  # at least one image
