"""The DDPM tutorial's UNet, with self-attention, and the EMA helper. At its defaults `UNet()` /
`UNet_conditional(num_classes=10)` has the tutorial's state-dict keys and function: its checkpoints load here. Beyond
it: image sizes divisible by 8, any channel count, `width`, `attention` resolutions, GroupNorm groups, FiLM."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA:
    """Moving average of a model's weights: ema = beta * ema + (1 - beta) * model; a copy for `step_start_ema` steps."""

    def __init__(self, beta):
        self.beta = beta
        self.step = 0
        self.average = get_ema_multi_avg_fn(beta)  # torch's: one foreach lerp over all parameters

    @torch.no_grad()
    def step_ema(self, ema_model, model, step_start_ema=2000):
        if self.step < step_start_ema:
            self.reset_parameters(ema_model, model)
        else:
            self.update_model_average(ema_model, model)
        self.step += 1

    @torch.no_grad()
    def update_model_average(self, ema_model, model):
        self.average(list(ema_model.parameters()), list(model.parameters()), None)  # ema + (1 - beta) (current - ema)

    @torch.no_grad()
    def reset_parameters(self, ema_model, model):
        torch._foreach_copy_(list(ema_model.parameters()), list(model.parameters()))  # one kernel, not one a tensor


class SelfAttention(nn.Module):
    """Pre-LayerNorm multi-head self-attention over the H*W positions, then a residual feed-forward block, with
    nn.MultiheadAttention's parameters (the tutorial's keys) but F.scaled_dot_product_attention (in fp32 when training
    on a CPU in bf16: torch's CPU backward is faster so). `size` (the tutorial's) is ignored: the input's is used."""

    def __init__(self, channels, size=None, heads=4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"SelfAttention: {channels} channels do not split into {heads} heads")
        self.heads = heads
        self.mha = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.ln = nn.LayerNorm([channels])
        self.ff_self = nn.Sequential(
            nn.LayerNorm([channels]),
            nn.Linear(channels, channels),
            nn.GELU(),
            nn.Linear(channels, channels),
        )

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (b, h*w, c)
        qkv = F.linear(self.ln(x), self.mha.in_proj_weight, self.mha.in_proj_bias)
        q, k, v = qkv.unflatten(-1, (3, self.heads, c // self.heads)).permute(2, 0, 3, 1, 4)  # 3 x (b, heads, hw, d)
        if qkv.requires_grad and qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16:
            with torch.autocast("cpu", enabled=False):
                attention = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        elif qkv.device.type == "mps" and not qkv.requires_grad:  # MPS holds the (hw x hw) scores of every head
            attention = attention_in_chunks(q, k, v)
        else:
            attention = F.scaled_dot_product_attention(q, k, v)
        attention = attention.transpose(1, 2).flatten(2)  # (b, hw, c)
        x = self.mha.out_proj(attention) + x
        x = self.ff_self(x) + x
        return x.transpose(1, 2).unflatten(2, (h, w))


def attention_in_chunks(q, k, v, max_bytes=2 ** 30):
    """scaled_dot_product_attention a few images at a time, so that their (positions x positions) scores fit in
    max_bytes: Apple MPS's kernel holds them all (64x64 attention: 256 MiB an image; a sample grid's: tens of GiB)."""
    images = max(1, max_bytes // (4 * q.shape[1] * q.shape[2] * k.shape[2]))
    return torch.cat([F.scaled_dot_product_attention(q[i:i + images], k[i:i + images], v[i:i + images])
                      for i in range(0, len(q), images)])


class DoubleConv(nn.Module):
    def __init__(self, in_channels, out_channels, mid_channels=None, residual=False, groups=1):
        super().__init__()
        self.residual = residual
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, mid_channels),
            nn.GELU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
        )

    def forward(self, x):
        if self.residual:
            return F.gelu(x + self.double_conv(x))
        return self.double_conv(x)


def apply_embedding(x, emb, film):
    """The block's output with the projected time (and label) embedding: added, as in the tutorial, or with FiLM
    (ADM's scale-shift norm, Dhariwal & Nichol 2021) as a per-channel scale and shift, x (1 + scale) + shift."""
    emb = emb[:, :, None, None]
    if film:
        scale, shift = emb.chunk(2, dim=1)
        return x * (1 + scale) + shift
    return x + emb


class Down(nn.Module):
    """Halve the resolution, a residual DoubleConv and one that changes the width, then apply_embedding."""

    def __init__(self, in_channels, out_channels, emb_dim=256, groups=1, film=False):
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            nn.MaxPool2d(2),
            DoubleConv(in_channels, in_channels, residual=True, groups=groups),
            DoubleConv(in_channels, out_channels, groups=groups),
        )
        self.film = film
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels * (2 if film else 1)))

    def forward(self, x, t):
        return apply_embedding(self.maxpool_conv(x), self.emb_layer(t), self.film)


class Up(nn.Module):
    """Double the resolution, concatenate the skip connection, then Down's two DoubleConvs and apply_embedding."""

    def __init__(self, in_channels, out_channels, emb_dim=256, groups=1, film=False):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = nn.Sequential(
            DoubleConv(in_channels, in_channels, residual=True, groups=groups),
            DoubleConv(in_channels, out_channels, in_channels // 2, groups=groups),
        )
        self.film = film
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels * (2 if film else 1)))

    def forward(self, x, skip_x, t):
        x = self.up(x)
        x = torch.cat([skip_x, x], dim=1)
        return apply_embedding(self.conv(x), self.emb_layer(t), self.film)


class UNet(nn.Module):
    """Three Down and three Up levels, a 3-block bottleneck, self-attention after each level. width: channels at full
    resolution (the tutorial's 64); the levels below have 2x, 4x, 4x, the bottleneck 8x. attention: the downsampling
    factors where self-attention runs: 1 full resolution (sa6), 2 half (sa1, sa5), 4 a quarter (sa2, sa4), 8 an eighth
    (sa3); the tutorial's (1, 2, 4, 8) is all six. device: ignored (use .to(device))."""

    def __init__(self, c_in=3, c_out=3, time_dim=256, width=64, attention=(1, 2, 4, 8), device=None, norm_groups=1,
                 film=False):
        super().__init__()  # (a ValueError names the option: make_model shows it as one line)
        if width < 4 or width % 4:
            raise ValueError(f"width={width}: must be a positive multiple of 4 (self-attention uses 4 heads)")
        if norm_groups < 1 or width % norm_groups:
            raise ValueError(f"norm_groups={norm_groups}: must divide width={width}")
        if not set(attention) <= {1, 2, 4, 8}:
            raise ValueError(f"attention={tuple(attention)}: factors must be among 1, 2, 4, 8")
        self.time_dim, w, g = time_dim, width, norm_groups

        def attn(channels, factor):
            return SelfAttention(channels) if factor in attention else nn.Identity()

        self.inc = DoubleConv(c_in, w, groups=g)
        self.down1 = Down(w, 2 * w, time_dim, g, film)
        self.sa1 = attn(2 * w, 2)
        self.down2 = Down(2 * w, 4 * w, time_dim, g, film)
        self.sa2 = attn(4 * w, 4)
        self.down3 = Down(4 * w, 4 * w, time_dim, g, film)
        self.sa3 = attn(4 * w, 8)

        self.bot1 = DoubleConv(4 * w, 8 * w, groups=g)
        self.bot2 = DoubleConv(8 * w, 8 * w, groups=g)
        self.bot3 = DoubleConv(8 * w, 4 * w, groups=g)

        self.up1 = Up(8 * w, 2 * w, time_dim, g, film)
        self.sa4 = attn(2 * w, 4)
        self.up2 = Up(4 * w, w, time_dim, g, film)
        self.sa5 = attn(w, 2)
        self.up3 = Up(2 * w, w, time_dim, g, film)
        self.sa6 = attn(w, 1)
        self.outc = nn.Conv2d(w, c_out, kernel_size=1)

    def pos_encoding(self, t, channels):
        """Sinusoidal timestep encoding (Vaswani et al. 2017): [sin(t f_i)] ++ [cos(t f_i)], f_i = 1e4^(-2i/C)."""
        inv_freq = 1.0 / (10000 ** (torch.arange(0, channels, 2, device=t.device).float() / channels))
        angles = t.float()[:, None] * inv_freq
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def unet_forward(self, x, emb):
        h, w = x.shape[-2:]
        if h % 8 or w % 8:
            raise ValueError(f"image size {h}x{w}: height and width must be divisible by 8 "
                             f"(the UNet halves them 3 times)")
        x1 = self.inc(x)
        x2 = self.sa1(self.down1(x1, emb))
        x3 = self.sa2(self.down2(x2, emb))
        x4 = self.sa3(self.down3(x3, emb))

        x4 = self.bot3(self.bot2(self.bot1(x4)))

        x = self.sa4(self.up1(x4, x3, emb))
        x = self.sa5(self.up2(x, x2, emb))
        x = self.sa6(self.up3(x, x1, emb))
        return self.outc(x)

    def forward(self, x, t):
        return self.unet_forward(x, self.pos_encoding(t, self.time_dim))


class UNet_conditional(UNet):
    """The UNet with a class embedding added to the time embedding. y: class indices (n,) (negative: the null
    condition), multi-hot float vectors (n, num_classes) (all zeros: the null condition), or None (the tutorial's)."""

    def __init__(self, c_in=3, c_out=3, time_dim=256, num_classes=None, width=64, attention=(1, 2, 4, 8), device=None,
                 norm_groups=1, film=False):
        super().__init__(c_in, c_out, time_dim, width, attention, norm_groups=norm_groups, film=film)
        self.num_classes = num_classes
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_dim)

    def label_embedding(self, y):
        if y.is_floating_point():  # multi-hot: sum of the rows of the classes that are on
            return y.to(self.label_emb.weight.dtype) @ self.label_emb.weight
        keep = (y >= 0).unsqueeze(-1)
        return self.label_emb(y.clamp(min=0)) * keep

    def forward(self, x, t, y=None):
        emb = self.pos_encoding(t, self.time_dim)
        if y is not None:
            emb = emb + self.label_embedding(y)
        return self.unet_forward(x, emb)
