"""
HA-GAN: the networks, one file. Hierarchical Amortized GAN (Sun et al., IEEE JBHI 2022),
https://ieeexplore.ieee.org/document/9770375 ; notation follows the paper (Table I):

    G^A  G.G_A   common trunk: z[, c] -> A, 64 channels on the (S/4)^3 grid
    G^L  G.G_L   A -> low-res volume X^L, (S/4)^3
    G^H  G.G_H   a slab of A (D/4/num_slabs slices) -> high-res slab (D/num_slabs x H x W); all of A -> S^3
    D^H  D.D_H   (high-res slab, its start r) -> logit
    D^L  D.D_L   low-res volume -> logit
    E^H  E_H     high-res slab -> its slice of A-hat
    E^G  E_G     A-hat (all slabs concatenated) -> Z-hat

The official code (github.com/batmanlab/HA-GAN) calls these Generator (G^A+G^H, with sub_G = G^L),
Discriminator (D^H, with sub_D = D^L), Encoder (E^H) and Sub_Encoder (E^G). With default widths our
modules have exactly its layers, so its checkpoints load (HAGAN.from_official) and generate the same
volumes. We also build any S in {32, 64, 128, 256, 512} and non-cubic (D, H, W) volumes by the same
rule, and a `width` factor shrinks every channel count for tests. `num_slabs` (the paper's 8) says
into how many slabs the depth axis is cut; every slab size and slab position derives from it.

Also here, because everything imports this file: the selector functions S^H / S^L, the losses of the
four updates, checkpoint loading, and the command-line config override used by every script.

    python train.py config/train_demo.py       # trains these networks
    python sample.py --out samples/            # generates with them
"""

import ast
import hashlib
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

GN_GROUPS = 8  # GroupNorm's group count in G and E (official); every channel count is a multiple of it

# -----------------------------------------------------------------------------
# configuration


@dataclass
class HAGANConfig:
    img_size: object = 256  # S, or a (D, H, W) triple; every dim a multiple of 32; D is the slab axis
    latent_dim: int = 1024  # size of Z
    num_classes: int = 0  # 0 = unconditional; >0 adds the AC-GAN heads and a one-hot c input to G^A
    width: float = 1.0  # multiplies every channel count below (1/8 gives CPU-sized test models)
    g_channels: int = 32  # official Generator `channel`: G^A goes 16x -> 2x this (A = 64 channels)
    dh_channels: int = 512  # official Discriminator `channel` (D^H)
    dl_channels: int = 256  # official Sub_Discriminator `channel` (D^L)
    eg_channels: int = 256  # official Sub_Encoder `channel` (E^G)
    num_slabs: int = 8  # the depth axis is cut into this many slabs (paper: 8); G^H and D^H train on one
    # beyond the paper (train.py's small-data options; off = the official networks)
    slab_context: bool = False  # G^H trains on a slab exactly as G^H(A) renders it (whole-volume norm, halo)
    mbstd_group: int = 0  # >0: D^H and D^L see the minibatch standard deviation over groups of this size
    d_width: float = 0.0  # >0: D^H's and D^L's channel multiplier instead of width (a stronger D costs little)
    out_scale: float = 1.0  # G^H's and G^L's outputs are out_scale * tanh; > 1 reaches the data's ends at finite inputs
    g_noise: bool = False  # G^H adds per-voxel noise, a function of z, before its last conv (StyleGAN's noise inputs)
    out_leak: float = 0.0  # >0: out_leak * the pre-activation is added to G's outputs: a gradient also at tanh's floor
    out_clip: bool = False  # G's outputs clipped to [-1, 1] in training too, as the data are (straight-through)
    gh_width: float = 0.0  # >0: G^H's hidden channel multiplier instead of width (the renderer wider, G^A as it is)
    g_pad: str = "zeros"  # G^H's conv padding: 'zeros' (official) or 'replicate' (no bright end slices)
    g_class: bool = False  # conditional: G^H's norm also gets a per-class gain and bias (BigGAN's conditional norm)
    d_stretch: float = 0.0  # >0: D^H sees intensities stretched near air (slope 1 + d_stretch at -1): lungs vs air
    class_window: tuple = ()  # (lo, hi[, top]) in [-1, 1]: the class term from a slab classifier C on that window over
    # the enclosed voxels below top (default hi), not the AC-GAN heads (conditional only; train.py sets it from the
    # data's units)
    class_twin: bool = False  # with class_window: G also maximises the cross-entropy of a twin of C trained on G's
    # slabs (TAC-GAN): C's term alone pushes G past the real classes towards what C is surest of

    def __post_init__(self):
        s = self.img_size
        s = (s, s, s) if isinstance(s, int) else tuple(int(d) for d in s)
        ok = len(s) == 3 and all(d >= 32 and d % 32 == 0 for d in s) and max(s) <= 512
        if not ok:
            raise ValueError(f"img_size {self.img_size!r} cannot be built: use S in 32, 64, 128, 256, 512, "
                             f"or a (D, H, W) triple whose dims are multiples of 32 between 32 and 512 "
                             f"(e.g. 160,192,224)")
        self.img_size = s[0] if s[0] == s[1] == s[2] else s
        if (self.latent_dim < 1 or self.num_classes < 0 or self.width <= 0 or self.d_width < 0 or self.gh_width < 0
                or self.out_scale < 1 or self.out_leak < 0 or self.d_stretch < 0):
            raise ValueError("latent_dim must be >= 1, num_classes >= 0, width > 0, d_width >= 0, gh_width >= 0, "
                             "out_scale >= 1, out_leak >= 0, d_stretch >= 0")
        self.class_window = tuple(float(v) for v in self.class_window)
        w = self.class_window
        if w and not (len(w) in (2, 3) and -1 <= w[0] and w[-1] <= 1 and all(a < b for a, b in zip(w, w[1:]))):
            raise ValueError(f"class_window={w}: use () or (lo, hi[, top]) with -1 <= lo < hi < top <= 1")
        if self.class_window and not self.num_classes:
            raise ValueError("class_window is for class-conditional models: set num_classes too")
        if self.class_twin and not self.class_window:
            raise ValueError("class_twin is the twin of class_window's classifier C: set class_window too")
        if self.g_class and not self.num_classes:
            raise ValueError("g_class is for class-conditional models: set num_classes too")
        if self.g_pad not in ("zeros", "replicate"):
            raise ValueError(f"g_pad={self.g_pad!r}: use 'zeros' (official) or 'replicate'")
        if self.num_slabs < 1 or s[0] // 4 % self.num_slabs:
            raise ValueError(f"num_slabs={self.num_slabs} must divide A's depth {s[0] // 4} (the volume's depth / 4), "
                             f"so that every slab is whole slices of A")

    @property
    def shape(self):  # (D, H, W) of the full-resolution volume
        s = self.img_size
        return (s, s, s) if isinstance(s, int) else tuple(s)

    @property
    def a_shape(self):  # grid of the feature map A and of the low-res volume
        return tuple(d // 4 for d in self.shape)

    @property
    def slab_a(self):  # slices of A in one training slab (S/32 with 8 slabs)
        return self.a_shape[0] // self.num_slabs

    @property
    def r_max(self):  # largest slab start on the A grid (56 at S=256 with 8 slabs)
        return self.a_shape[0] - self.slab_a

    def ch(self, n, width=0.0):
        # every width-scaled count stays a multiple of GN_GROUPS
        return max(GN_GROUPS, int(round(n * (width or self.width) / GN_GROUPS)) * GN_GROUPS)

    def ch_D(self, n):  # the discriminators' counts
        return self.ch(n, self.d_width)

    @property
    def ac_classes(self):  # classes of the AC-GAN heads of D^H and D^L: none when C judges the class
        return 0 if self.class_window else self.num_classes


# -----------------------------------------------------------------------------
# the selector functions S^L and S^H (paper eqs. 3-7). r is the slab start on the A grid; the
# high-res slab starts at 4r, so a real slab and a generated slab for the same r cover the same
# voxels (the official code draws r per voxel and crops A at r//4, which misaligns them).


def slab_range(r, depth, num_slabs):
    """High-res voxel range [start, stop) along axis D of slab r for a volume of depth `depth`."""
    n = depth // num_slabs
    r_max = depth // 4 - n // 4
    if not 0 <= r <= r_max:
        raise ValueError(f"slab start r={r} outside [0, {r_max}] for depth {depth} in {num_slabs} slabs")
    return 4 * r, 4 * r + n


def S_L(A, r, num_slabs):
    """S^L(A; r): the A slices that G^H lifts to the high-res slab r. (B,C,D/4,h,w) -> (B,C,D/4/num_slabs,h,w)"""
    return A[:, :, r:r + A.shape[2] // num_slabs]


def S_H(X, r, num_slabs):
    """S^H(X; r): the high-res slab r of a full volume. (B,1,D,H,W) -> (B,1,D/num_slabs,H,W)"""
    a, b = slab_range(r, X.shape[2], num_slabs)
    return X[:, :, a:b]


# -----------------------------------------------------------------------------
# spectral normalisation (Miyato et al. 2018), one power iteration per training forward as in the
# official layers. Sigma is computed in float32 with autocast off: under bf16/fp16 the power
# iteration's normalisation underflows (eps=1e-12) and returns NaN or a badly wrong sigma.


def _no_autocast(t):
    return torch.autocast("cpu" if t.device.type == "meta" else t.device.type, enabled=False)


def _sn_weight(m):
    W = m.weight.float().flatten(1)  # (out, in*k*k*k)
    with _no_autocast(W):
        with torch.no_grad():
            v = F.normalize(m.u @ W, dim=1, eps=1e-12)  # (1, in*k^3)
            u = F.normalize(v @ W.t(), dim=1, eps=1e-12)  # (1, out)
            if m.training:
                m.u.copy_(u)
        sigma = (v @ W.t() @ u.t()).squeeze()  # gradient flows through W only
        if m.training:
            m.sigma.copy_(sigma.detach())
    return m.weight / sigma.to(m.weight.dtype)


class SNConv3d(nn.Conv3d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("u", F.normalize(torch.randn(1, self.out_channels), dim=1))
        self.register_buffer("sigma", torch.ones(1))  # for logging, like official sv0

    def forward(self, x):
        return self._conv_forward(x, _sn_weight(self), self.bias)


class SNLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("u", F.normalize(torch.randn(1, self.out_features), dim=1))
        self.register_buffer("sigma", torch.ones(1))  # for logging, like official sv0

    def forward(self, x):
        return F.linear(x, _sn_weight(self), self.bias)


def _up(x):  # the official code's F.interpolate(scale_factor=2): nearest neighbour
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _halvings(dims, floor):
    """How many exact stride-2 halvings of every extent in dims keep the smallest one >= floor.
    Cubic sizes get the official stacks (S=256: 4 for A's grid, 3 for D^H's slab plane)."""
    k = 0
    while all(d % 2 == 0 for d in dims) and min(dims) // 2 >= floor:
        dims = [d // 2 for d in dims]
        k += 1
    return k


# -----------------------------------------------------------------------------
# generator


class G_A(nn.Module):
    """z[, one-hot c] -> A. fc to a small base grid, then 5 conv-GN-ReLU blocks with nearest 2x
    upsampling before as many of them as the grid needs (4 at S=256, 3 at S=128, as officially)."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.g_channels
        chans = [cfg.ch(16 * c), cfg.ch(16 * c), cfg.ch(8 * c), cfg.ch(4 * c), cfg.ch(2 * c)]
        a = cfg.a_shape
        n_up = min(_halvings(a, 4), 5)
        # upsample before blocks 2..5 first (official S=256: all four; S=128: 2..4), block 1 at S=512
        self.up = [i in (1, 2, 3, 4, 0)[:n_up] for i in range(5)]
        self.base = tuple(d >> n_up for d in a)
        self.num_classes = cfg.num_classes
        self.fc = nn.Linear(cfg.latent_dim + cfg.num_classes, chans[0] * math.prod(self.base))
        self.convs = nn.ModuleList(nn.Conv3d(i, o, 3, padding=1) for i, o in zip(chans[:1] + chans[:-1], chans))
        self.norms = nn.ModuleList(nn.GroupNorm(GN_GROUPS, o) for o in chans)

    def forward(self, z, c=None):
        if self.num_classes:
            if c is None:
                raise ValueError("this model is class-conditional: pass class labels c")
            z = torch.cat([z, F.one_hot(c.long(), self.num_classes).to(z.dtype)], dim=1)
        h = self.fc(z).view(z.shape[0], -1, *self.base)  # (B,512,4,4,4) at S=256
        for up, conv, norm in zip(self.up, self.convs, self.norms):
            h = F.relu(norm(conv(_up(h) if up else h)))
        return h  # A: (B,64,S/4,S/4,S/4)


class G_H(nn.Module):
    """A (or any slab of it) -> high-res volume: two nearest 2x upsamplings, 64 -> 32 -> 1 channels."""

    def __init__(self, cfg):
        super().__init__()
        c_a, c = cfg.ch(2 * cfg.g_channels), cfg.ch(cfg.g_channels, cfg.gh_width)
        # g_pad='replicate': zero padding makes the volume's first and last rows from features of 0, which
        # only the end slabs (2 of 15 slab positions at 64^3) ever show D^H; they come out brighter than air
        self.conv1 = nn.Conv3d(c_a, c, 3, padding=1, padding_mode=cfg.g_pad)
        self.norm1 = nn.GroupNorm(GN_GROUPS, c)
        self.conv2 = nn.Conv3d(c, 1, 3, padding=1, padding_mode=cfg.g_pad)
        self.out = (cfg.out_scale, cfg.out_leak, cfg.out_clip)  # _last_conv_tanh's scale, leak, clip
        # g_noise: the strength of the noise in each of conv2's input channels, learned from 0 (Karras et al. 2019)
        self.noise_scale = nn.Parameter(torch.zeros(c)) if cfg.g_noise else None
        # g_class (BigGAN's class-conditional norm, Brock et al. 2019): the class reaches the renderer directly. G^A
        # gets it only as K of its fc's inputs, beside z's latent_dim, and the demo's class is a texture that G^H
        # draws (the lungs' share below -950 HU). Learned from 0, so that G starts as the model without it
        self.class_affine = nn.Embedding(cfg.num_classes, 2 * c) if cfg.g_class else None  # g_class implies classes
        if self.class_affine is not None:
            nn.init.zeros_(self.class_affine.weight)

    def modulation(self, c):
        """g_class: per-sample (1 + gain, bias), each (B,C), for norm1's output; None without it or c."""
        if self.class_affine is None or c is None:
            return None
        g, b = self.class_affine(c.long()).chunk(2, 1)
        return 1 + g, b

    def forward(self, a, stats=None, noise=None, c=None):  # (B,64,d,h,w) -> (B,1,4d,4h,4w)
        """stats: norm1's (mean, 1/std), each (B, groups), to normalise with instead of a's own; the
        whole volume's (see stats) make G^H of a slab of A equal that slab of G^H(A). noise: (B,1,4d,4h,4w)
        from Generator.noise, with g_noise; None adds none (E^H's reconstructions, which have no z). c: (B,) class
        labels, with g_class; None leaves norm1's output unmodulated."""
        h = self.conv1(_up(a))
        if stats is None:
            h = self.norm1(h)
        else:
            B, C, G = h.shape[0], h.shape[1], self.norm1.num_groups
            mean, rstd = (s.to(h.dtype)[:, :, None] for s in stats)
            h = ((h.reshape(B, G, -1) - mean) * rstd).view(h.shape)
            h = h * self.norm1.weight.view(1, C, 1, 1, 1) + self.norm1.bias.view(1, C, 1, 1, 1)
        if (mod := self.modulation(c)) is not None:
            h = h * mod[0].to(h.dtype)[:, :, None, None, None] + mod[1].to(h.dtype)[:, :, None, None, None]
        return _last_conv_tanh(self.conv2, self.add_noise(_up(F.relu(h)), noise), *self.out)

    def add_noise(self, h, noise):  # (B,C,D,H,W) + (B,1,D,H,W) * (C,)
        if noise is None or self.noise_scale is None:
            return h
        return h + noise.to(h.dtype) * self.noise_scale.to(h.dtype).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def stats(self, A, chunk, keep=None):
        """norm1's GroupNorm statistics over the whole volume G^H(A) sees: (mean, 1/std), each (B, groups).
        conv1's output is made `chunk` A-slices at a time and the statistics merged (Chan et al., in
        float64), so memory stays that of one chunk; `keep`, if given, receives conv1's whole output."""
        n, ny, G = A.shape[2], 2 * A.shape[2], self.norm1.num_groups
        mean = m2 = None
        cnt = 0
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            lo, hi = max(a - 1, 0), min(b + 1, n)
            y = _depth_conv(self.conv1, _up(A[:, :, lo:hi]), 2 * lo, ny, 2 * a, 2 * b)  # (B,32,2k,2h,2w)
            if keep is not None:
                keep[:, :, 2 * a:2 * b] = y
            v, mu = torch.var_mean(y.reshape(y.shape[0], G, -1).float(), dim=2, correction=0)
            nb = y[0, 0].numel() * (y.shape[1] // G)
            if mean is None:
                mean, m2 = mu.double(), v.double() * nb
            else:
                d = mu.double() - mean
                mean = mean + d * nb / (cnt + nb)
                m2 = m2 + v.double() * nb + d * d * cnt * nb / (cnt + nb)
            cnt += nb
        return mean, torch.rsqrt(m2 / cnt + self.norm1.eps)


class G_L(nn.Module):
    """A -> low-res volume on the same grid: 64 -> 32 -> 16 -> 1 channels."""

    def __init__(self, cfg):
        super().__init__()
        c_a, c = cfg.ch(2 * cfg.g_channels), cfg.ch(cfg.g_channels)
        self.conv1 = nn.Conv3d(c_a, c, 3, padding=1)
        self.norm1 = nn.GroupNorm(GN_GROUPS, c)
        self.conv2 = nn.Conv3d(c, cfg.ch(cfg.g_channels // 2), 3, padding=1)
        self.norm2 = nn.GroupNorm(GN_GROUPS, cfg.ch(cfg.g_channels // 2))
        self.conv3 = nn.Conv3d(cfg.ch(cfg.g_channels // 2), 1, 3, padding=1)
        self.out = (cfg.out_scale, cfg.out_leak, cfg.out_clip)  # _last_conv_tanh's scale, leak, clip

    def forward(self, a):  # (B,64,S/4,S/4,S/4) -> (B,1,S/4,S/4,S/4)
        h = F.relu(self.norm1(self.conv1(a)))
        h = F.relu(self.norm2(self.conv2(h)))
        return _last_conv_tanh(self.conv3, h, *self.out)


def _last_conv_tanh(conv, h, scale=1.0, leak=0.0, clip=False):
    # conv: the layer, or any function of its input (the chunked render's _depth_conv). The output
    # layer runs in float32 even under autocast: in bf16, tanh near +-1 has a resolution of several HU
    # in the CT window, which shows up as banding in the samples.
    # scale > 1 (out_scale, beyond the paper): air (-1) and the window's top are reached at finite
    # inputs. With plain tanh they are not, and the dark tissue next to air goes with it into
    # saturation, where tanh' ~ 0 and D's gradient no longer reaches it (the demo's lungs at -1024 HU).
    # leak > 0 (out_leak): even at scale's floor the slope is leak. D sees a voxel pushed below -1 as
    # darker than any real one, and G can still move it back; generate clamps to [-1, 1]
    # clip (out_clip): the data were clipped to the window (air is exactly -1), so G's output is clipped
    # the same way in training too. Without it G must hold air at -1 itself, on a knife's edge between
    # "darker than any scan" and grey; clipped, any depth below -1 is air, and the air keeps a margin
    # from -950 HU. The gradient passes the clip unchanged (straight-through), so a clipped voxel still
    # gets D's gradient; but D sees it as plain air, so a lung pushed below -1 is no longer pulled back as
    # too dark (on the wide demo model the lungs came out darker: README, "What reaches the targets")
    with _no_autocast(h):
        p = conv(h.float())
        y = torch.tanh(p)
        y = y if scale == 1 else y * scale
        y = y if leak == 0 else y + leak * p
        return y + (y.clamp(-1, 1) - y).detach() if clip else y


class Generator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.G_A, self.G_L, self.G_H = G_A(cfg), G_L(cfg), G_H(cfg)

    def forward(self, z, r, c=None):
        """Training forward (eqs. 2-3): (high-res slab at r (B,1,D/num_slabs,H,W), low-res (B,1,D/4,H/4,W/4)).
        Only A's slab r goes through G^H, so no full-resolution tensor is ever made. r=None lifts all
        of A instead: the non-amortised model that eval.py --bench compares against."""
        A = self.G_A(z, c)
        n = self.cfg.slab_a
        if r is None or not self.cfg.slab_context:
            lo, hi = (0, A.shape[2]) if r is None else (r, r + n)  # the A slices lifted, 4x as many rows out
            a = A if r is None else S_L(A, r, self.cfg.num_slabs)
            return self.G_H(a, noise=self.noise(z, 4 * lo, 4 * hi), c=c), self.G_L(A)
        # slab_context: what D^H judges is exactly slab r of the volume sampled at inference, G^H(A).
        # The official G^H normalises a slab by its own statistics and pads its ends with zeros, and
        # at inference by the whole volume's with real neighbours. Here: the whole volume's statistics
        # (no gradient through them), and one slice of A either side, cropped off after G^H.
        lo, hi = max(r - 1, 0), min(r + n + 1, A.shape[2])
        x = self.G_H(A[:, :, lo:hi], self.G_H.stats(A, n), self.noise(z, 4 * lo, 4 * hi), c)
        return x[:, :, 4 * (r - lo):4 * (r - lo + n)], self.G_L(A)

    def noise(self, z, a, b):
        """g_noise: N(0,1) for rows [a, b) of G^H's output grid, (B,1,b-a,H,W), a function of each sample's
        z alone, drawn row by row: a volume is the same however it is batched, chunked or cut into
        training slabs, and resume and DDP stay exact. None without g_noise."""
        if not self.cfg.g_noise:
            return None
        H, W = self.cfg.shape[1:]
        out = torch.empty(z.shape[0], 1, b - a, H, W)
        for i, zi in enumerate(z.detach().float().cpu()):
            base = int.from_bytes(hashlib.sha256(zi.numpy().tobytes()).digest()[:8], "little")
            for j, row in enumerate(range(a, b)):
                gen = torch.Generator().manual_seed((base + row * 0x9E3779B97F4A7C15) % (1 << 63))
                out[i, 0, j] = torch.randn(H, W, generator=gen)
        return out.to(z.device)

    @torch.no_grad()
    def generate(self, z, c=None, chunk=0):
        """Whole S^3 volumes, (B,1,D,H,W): G^H on all of A (paper Fig. 2). With chunk=k, G^H runs k
        slices of A at a time and gives the same result (to float rounding) in bounded memory."""
        A = self.G_A(z, c)
        noise = self.noise(z, 0, self.cfg.shape[0])
        x = self._G_H_chunked(A, int(chunk), noise, c) if chunk else self.G_H(A, noise=noise, c=c)
        # out_scale > 1 or out_leak > 0: D taught G the data's range, and a sample keeps to it exactly
        return x.clamp_(-1, 1) if self.cfg.out_scale != 1 or self.cfg.out_leak else x

    def _G_H_chunked(self, A, k, noise=None, c=None):
        """G^H(A) in depth chunks of k A-slices. GroupNorm normalises over the whole volume, so a
        first pass (G_H.stats) computes conv1's output Y chunk by chunk and its per-group statistics;
        Y (1/8 of the output's voxels at 32 channels) is kept so that this, the most expensive conv, runs
        once. Each chunk then needs one neighbouring slice of Y on either side for the last 3x3x3 conv."""
        g = self.G_H
        n, ny, G = A.shape[2], 2 * A.shape[2], g.norm1.num_groups
        Y = A.new_empty(A.shape[0], g.conv1.out_channels, ny, 2 * A.shape[3], 2 * A.shape[4])
        mean, rstd = g.stats(A, k, keep=Y)
        cpg = Y.shape[1] // G
        rstd = rstd.repeat_interleave(cpg, 1)  # (B,C)
        scale = rstd * g.norm1.weight.double()  # (B,C)
        shift = g.norm1.bias.double() - mean.repeat_interleave(cpg, 1) * scale
        if (mod := g.modulation(c)) is not None:  # g_class: (B,C) each
            scale, shift = scale * mod[0].double(), shift * mod[0].double() + mod[1].double()
        scale, shift = (t.to(Y.dtype)[:, :, None, None, None] for t in (scale, shift))  # (B,C,1,1,1)
        out = None
        for a in range(0, n, k):
            b = min(a + k, n)
            lo, hi = max(2 * a - 1, 0), min(2 * b + 1, ny)
            h = _up(torch.addcmul(shift, Y[:, :, lo:hi], scale).relu_())  # rows [2lo, 2hi) of the 4x grid
            h = g.add_noise(h, None if noise is None else noise[:, :, 2 * lo:2 * hi])
            # G^H's output layer on this chunk's rows: (B,1,4k,H,W)
            x = _last_conv_tanh(lambda t: _depth_conv(g.conv2, t, 2 * lo, 4 * n, 4 * a, 4 * b), h, *g.out)
            if out is None:
                out = x.new_empty(x.shape[0], 1, 4 * n, *x.shape[3:])
            out[:, :, 4 * a:4 * b] = x
        return out

def _depth_conv(conv, x, x0, n, y0, y1):
    """Rows [y0, y1) along depth of conv(full) for a 3x3x3 conv with padding 1, where x holds rows
    [x0, x0 + x.shape[2]) of the full input of depth n. Rows outside [0, n) are the conv's padding
    (zeros or replicate), so chunk edges that are volume edges match the whole-volume result exactly."""
    lo, hi = max(y0 - 1, 0), min(y1 + 1, n)
    mode = "replicate" if conv.padding_mode == "replicate" else "constant"
    x = F.pad(x[:, :, lo - x0:hi - x0], (1, 1, 1, 1, lo - (y0 - 1), (y1 + 1) - hi), mode=mode)
    return F.conv3d(x, conv.weight, conv.bias)


# -----------------------------------------------------------------------------
# discriminators


STRETCH_WIDTH = 0.2  # d_stretch acts within about this much of -1: 162 HU above air in the CT window


def stretch_dark(x, gain):
    """D^H's view of intensities under d_stretch (beyond the paper): x + gain * w * tanh((x + 1) / w).
    -1 stays -1, the slope there is 1 + gain, and from about -1 + 4w (soft tissue and up) it is 1 again:
    those voxels are only shifted, so D^H keeps its eye for tissue and bone. Why: the phantoms' lungs (-860 HU,
    -0.80) are 0.17 above air, and a spectrally normalised D^H barely tells them from air, so G^H drew
    the lungs as air (README, "The demo"). Applied inside D^H, so real and generated slabs alike."""
    return x if gain == 0 else x + (gain * STRETCH_WIDTH) * torch.tanh((x + 1) / STRETCH_WIDTH)


class D_H(nn.Module):
    """(high-res slab (B,1,D/num_slabs,H,W), r) -> logit (B,1) [, class logits (B,K)]. Stride-2 4^3
    convs bring the slab's plane to 32x32 (3 of them at S=256, 2 at S=128), then the official tail,
    whose convs halve the depth while it is >= 2 and end on what is left."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.dh_channels
        D, H, W = cfg.shape
        n_stem = _halvings((H, W), 32)
        stem = [cfg.ch_D(c // 8 >> (n_stem - 1 - i)) for i in range(n_stem)]
        chans = [1] + stem
        convs = [SNConv3d(i, o, 4, 2, 1) for i, o in zip(chans[:-1], chans[1:])]
        d, h, w = D // cfg.num_slabs >> n_stem, H >> n_stem, W >> n_stem
        if d < 1:
            raise ValueError(f"num_slabs={cfg.num_slabs}: a slab of {D // cfg.num_slabs} voxels is too thin for "
                             f"D^H's {n_stem} stride-2 convs at this size; use fewer slabs")
        prev = chans[-1]
        for o in (cfg.ch_D(c // 4), cfg.ch_D(c // 2)):  # official conv4, conv5: depth and plane halve
            kd = 2 if d >= 2 else 1
            convs.append(SNConv3d(prev, o, (kd, 4, 4), (kd, 2, 2), (0, 1, 1)))
            d, h, w, prev = d // kd, h // 2, w // 2, o
        convs.append(SNConv3d(prev, cfg.ch_D(c), (1, 4, 4), (1, 2, 2), (0, 1, 1)))  # conv6
        h, w = h // 2, w // 2
        # conv7: (1,4,4) for cubic S; with mbstd_group it also sees the minibatch standard deviation
        convs.append(SNConv3d(cfg.ch_D(c) + (cfg.mbstd_group > 0), cfg.ch_D(c // 4), (d, h, w)))
        self.convs = nn.ModuleList(convs)
        self.mbstd_group = cfg.mbstd_group
        self.fc1 = SNLinear(cfg.ch_D(c // 4) + 1, cfg.ch_D(c // 8))
        self.fc2 = SNLinear(cfg.ch_D(c // 8), 1)
        self.fc_class = SNLinear(cfg.ch_D(c // 8), cfg.ac_classes) if cfg.ac_classes else None
        self.r_max, self.d_stretch = cfg.r_max, cfg.d_stretch

    def forward(self, x, r):
        x = stretch_dark(x, self.d_stretch)
        for i, conv in enumerate(self.convs):
            if self.mbstd_group and i == len(self.convs) - 1:
                x = mbstd(x, self.mbstd_group)
            x = F.leaky_relu(conv(x), 0.2)
        x = x.flatten(1)  # (B,128)
        # r enters normalised to [0, 1] by this S's largest start (official: crop_idx/224 at 256)
        pos = torch.full((x.shape[0], 1), r / max(self.r_max, 1), dtype=x.dtype, device=x.device)
        x = F.leaky_relu(self.fc1(torch.cat([x, pos], 1)), 0.2)
        return self.fc2(x), (self.fc_class(x) if self.fc_class is not None else None)


class D_L(nn.Module):
    """low-res volume (B,1,S/4,S/4,S/4) -> logit (B,1) [, class logits (B,K)]."""

    def __init__(self, cfg):
        super().__init__()
        c, a = cfg.dl_channels, cfg.a_shape
        n = _halvings(a, 4)
        chans = [1] + [cfg.ch_D(c >> (n - 1 - i)) for i in range(n)]
        self.convs = nn.ModuleList(SNConv3d(i, o, 4, 2, 1) for i, o in zip(chans[:-1], chans[1:]))
        self.head = SNConv3d(chans[-1] + (cfg.mbstd_group > 0), 1 + cfg.ac_classes, tuple(d >> n for d in a))
        self.num_classes, self.mbstd_group = cfg.ac_classes, cfg.mbstd_group

    def forward(self, x):
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        if self.mbstd_group:
            x = mbstd(x, self.mbstd_group)
        x = self.head(x).flatten(1)  # (B,1+K)
        return x[:, :1], (x[:, 1:] if self.num_classes else None)


def mbstd(x, group):
    """Minibatch standard deviation (Karras et al. 2018), beyond the paper: one more channel holding how
    much the samples of each group differ, so D sees it when G makes the same volume again and again.
    Samples i, i + B/g, i + 2B/g, ... form a group. (B,C,d,h,w) -> (B,C+1,d,h,w)"""
    B = x.shape[0]
    g = min(group, B)
    while B % g:
        g -= 1
    y = x.float().view(g, B // g, *x.shape[1:])
    s = (y.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3, 4))  # (B/g,)
    return torch.cat([x, s.repeat(g).to(x.dtype).view(B, 1, 1, 1, 1).expand(B, 1, *x.shape[2:])], 1)


class SlabClassifier(nn.Module):
    """C, beyond the paper (class_window): high-res slab (B,1,d,H,W) -> class logits (B,K). The paper's
    AC-GAN heads share D's features and are trained on fakes too; in the demo G wrote the class as a
    code that D^L read (D^L named the fakes' class 97-100% right, held-out phantoms' at chance). A conv
    classifier trained on real slabs only did no better: from 102 phantoms it learnt their anatomy, not
    their class (held-out 0.19-0.42), and G learnt to draw what it had memorised. So C sees no shapes:
    a learnt function of each voxel's windowed intensity alone, averaged over the voxels below the
    window's top that the body encloses in their axial slice (the lungs, for a CT lung window). It reads
    the class as a radiologist's density index does, from the enclosed region's intensity distribution
    (LAA-950 is one such function), and names held-out phantoms' class 0.70 of the time. The mask is a
    constant of the input (no gradient); G's gradient flows through the intensities it covers. With a
    top above the window (lo, hi, top), the mask takes the enclosed voxels below top and reads those
    above hi as hi: C's push to brighten a low class's lungs ends at hi, and lungs pushed past it are
    still lungs to C rather than leaving its mask (README: the thirteenth pass)."""

    def __init__(self, cfg, width=16):
        super().__init__()
        self.window = cfg.class_window
        self.f = nn.Sequential(nn.Linear(1, width), nn.LeakyReLU(0.2), nn.Linear(width, width), nn.LeakyReLU(0.2))
        self.out = nn.Linear(width, cfg.num_classes)

    def region(self, x):
        """The voxels C reads in slabs x (B,1,d,H,W): a mask (B,d*H*W), the enclosed voxels below the window's top
        (top: hi unless given; the lungs, for a lung window), and each of them's slab. A twin of C (class_twin)
        reads the same voxels, so one region serves both."""
        B = x.shape[0]
        with torch.no_grad():
            m = enclosed(x.detach().flatten(0, 2) < self.window[-1]).view(B, -1)
            return m, torch.arange(B, device=x.device).repeat_interleave(m.sum(1))

    def forward(self, x, region=None):
        (lo, hi), B = self.window[:2], x.shape[0]
        m, which = self.region(x) if region is None else region
        v = ((x.reshape(B, -1)[m] - lo) / (hi - lo)).clamp(0, 1)  # (n,): the window -> [0, 1]
        h = self.f(v[:, None].float())  # (n,width): only the enclosed voxels, a few % of the slab
        mean = h.new_zeros(B, h.shape[1]).index_add(0, which, h) / m.sum(1, keepdim=True).clamp_min(1)
        return self.out(mean)  # a slab with no enclosed voxel: the prior (the bias)


def enclosed(dark):
    """The voxels of a (N,H,W) boolean mask that have a voxel outside the mask on all four sides in their
    row and column: what a body encloses, in one pass (cumulative maxima). eval.py's lung mask is the exact
    version, a flood fill from the border (4x slower here); they agree where the enclosure is convex along
    rows and columns, as a thorax is for its lungs (the same voxels on the demo's phantoms)."""
    wall = (~dark).to(torch.uint8)
    seen = lambda t, dim: t.cummax(dim).values.bool()
    return dark & seen(wall, 1) & seen(wall.flip(1), 1).flip(1) & seen(wall, 2) & seen(wall.flip(2), 2).flip(2)


class Discriminator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.D_H, self.D_L = D_H(cfg), D_L(cfg)
        self.C = SlabClassifier(cfg) if cfg.class_window else None  # class_window implies num_classes
        self.C_twin = SlabClassifier(cfg) if cfg.class_twin else None  # C's twin: G's slabs, not real ones
        self.num_slabs, self.slab_a = cfg.num_slabs, cfg.slab_a

    def forward(self, slab, r, low):
        """Logits of D^H and D^L averaged, as the official code does; the class logits likewise.
        r=None: `slab` is the whole volume and D^H judges every one of its slabs (the non-amortised
        model of eval.py --bench), their logits averaged."""
        if r is None:
            n = slab.shape[2] // self.num_slabs
            hs = [self.D_H(slab[:, :, v * n:(v + 1) * n], v * self.slab_a) for v in range(self.num_slabs)]
            h = torch.stack([a for a, _ in hs]).mean(0)
            hc = None if hs[0][1] is None else torch.stack([b for _, b in hs]).mean(0)
        else:
            h, hc = self.D_H(slab, r)
        l, lc = self.D_L(low)
        return (h + l) / 2, (None if hc is None else (hc + lc) / 2)


# -----------------------------------------------------------------------------
# encoders


class E_H(nn.Module):
    """high-res slab (B,1,d,H,W) -> its part of A-hat (B,64,d/4,H/4,W/4)."""

    def __init__(self, cfg):
        super().__init__()
        c, h = cfg.ch(2 * cfg.g_channels), cfg.ch(cfg.g_channels)  # c = A's channels: G^H lifts E^H's output
        self.conv1 = nn.Conv3d(1, h, 4, 2, 1)
        self.norm1 = nn.GroupNorm(GN_GROUPS, h)
        self.conv2 = nn.Conv3d(h, h, 3, 1, 1)
        self.norm2 = nn.GroupNorm(GN_GROUPS, h)
        self.conv3 = nn.Conv3d(h, c, 4, 2, 1)
        self.norm3 = nn.GroupNorm(GN_GROUPS, c)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        return F.relu(self.norm3(self.conv3(x)))


class E_G(nn.Module):
    """A-hat (B,64,S/4,S/4,S/4) -> Z-hat (B,latent_dim)."""

    def __init__(self, cfg):
        super().__init__()
        c, a = cfg.eg_channels, cfg.a_shape
        n = _halvings(a, 4)
        chans = [cfg.ch(2 * cfg.g_channels)] + [cfg.ch(c >> (n - 1 - i)) for i in range(n)]
        self.convs = nn.ModuleList(nn.Conv3d(i, o, 4, 2, 1) for i, o in zip(chans[:-1], chans[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(GN_GROUPS, o) for o in chans[1:])
        self.head = nn.Conv3d(chans[-1], cfg.latent_dim, tuple(d >> n for d in a))

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return self.head(x).flatten(1)


# -----------------------------------------------------------------------------
# the whole model

NETS = ("D", "G", "E_H", "E_G")  # the four networks, in the order the paper's updates train them


class HAGAN(nn.Module):
    def __init__(self, cfg=None, **kwargs):
        super().__init__()
        cfg = cfg if cfg is not None else HAGANConfig(**kwargs)
        self.cfg = cfg
        self.G = Generator(cfg)
        self.D = Discriminator(cfg)
        self.E_H = E_H(cfg)
        self.E_G = E_G(cfg)
        n = {k: sum(p.numel() for p in getattr(self, k).parameters()) for k in ("G", "D", "E_H", "E_G")}
        print(f"HA-GAN {'x'.join(map(str, cfg.shape))}: parameters G {n['G'] / 1e6:.2f}M, D {n['D'] / 1e6:.2f}M, "
              f"E_H {n['E_H'] / 1e6:.3f}M, E_G {n['E_G'] / 1e6:.2f}M, total {sum(n.values()) / 1e6:.2f}M")

    def generate(self, z, c=None, chunk=0):
        return self.G.generate(z, c, chunk)

    def train_only(self, name):
        """Gradients for network `name` alone ('D', 'G', 'E_H' or 'E_G'): each of the paper's four
        alternating updates trains one network against the others frozen. Returns that network."""
        for k in NETS:
            getattr(self, k).requires_grad_(k == name)
        return getattr(self, name)

    def configure_optimizers(self, lr_G=1e-4, lr_D=4e-4, lr_E=1e-4, betas=(0.0, 0.999)):
        """One Adam per update, keyed and ordered as the updates run (defaults: paper Sec. III-E)."""
        lrs = dict(D=lr_D, G=lr_G, E_H=lr_E, E_G=lr_E)
        return {k: torch.optim.Adam(getattr(self, k).parameters(), lr=lrs[k], betas=betas, eps=1e-8) for k in NETS}

    @torch.no_grad()
    def encode_A(self, x):
        """A-hat for whole volumes x (B,1,D,H,W): E^H on each of the num_slabs non-overlapping slabs
        T_v, concatenated on A's grid (paper Sec. III-C). One slab's activations at a time."""
        n = x.shape[2] // self.cfg.num_slabs
        return torch.cat([self.E_H(x[:, :, v:v + n]) for v in range(0, x.shape[2], n)], dim=2)

    @torch.no_grad()
    def encode(self, x):
        """Z-hat = E^G(A-hat) for whole volumes x (B,1,D,H,W) -> (B,latent_dim)."""
        return self.E_G(self.encode_A(x))

    # -------------------------------------------------------------------------
    # the losses of the four alternating updates (paper eqs. 4-9). Each returns (loss, stats), stats a
    # dict of scalar tensors that train.py logs as they come; train.py (step) and eval.py --bench train
    # one network with each (train_only). r=None: x_slab is the whole volume (the non-amortised model).

    def loss_D(self, x_slab, x_low, r, z, c=None, aug=None, r1=0.0, x=None, lecam=None):
        """Eqs. 4-5 for D^H and D^L (non-saturating BCE on averaged logits) [+ eq. 9, both terms].
        Beyond the paper: `aug` (augment_params) is applied alike to the real and the fake pair;
        r1 > 0 adds r1 times the R1 penalty at the real inputs (Mescheder et al. 2018); lecam = (weight,
        anchor_real, anchor_fake) adds weight times lecam_penalty (Tseng et al. 2021); with
        class_window, eq. 9 is C's cross-entropy on real slabs only: every slab of the whole real
        volumes x (B,1,D,H,W) when given, else x_slab; with class_twin, plus C_twin's on the fake slab."""
        with torch.no_grad():
            fake_slab, fake_low = self.G(z, r, c)
        if r1:
            x_slab, x_low = x_slab.detach().requires_grad_(True), x_low.detach().requires_grad_(True)
        real, real_cls = self.D(*_swap(augment(x_slab, x_low, r, aug), r))
        fake, fake_cls = self.D(*_swap(augment(fake_slab, fake_low, r, aug), r))
        loss = _bce(real, 1.0) + _bce(fake, 0.0)
        stats = dict(D_real=real.detach().float().mean(), D_fake=fake.detach().float().mean(),
                     D_real_sign=real.detach().float().sign().mean())  # ADA's overfitting signal
        if c is not None and self.D.C is not None:
            fake_region = self.D.C.region(fake_slab)
            if self.D.C_twin is not None:
                twin_cls = self.D.C_twin(fake_slab, fake_region)
                loss = loss + F.cross_entropy(twin_cls.float(), c)
                stats["cls_twin"] = (twin_cls.detach().argmax(1) == c).float().mean()  # chance: G's classes alike
            if x is None:
                real_cls = self.D.C(x_slab.detach())
            else:  # all num_slabs slabs of each volume: (num_slabs*B,1,D/num_slabs,H,W), classes repeated
                real_cls = self.D.C(torch.cat(x.detach().chunk(self.cfg.num_slabs, dim=2)))
                c = c.repeat(self.cfg.num_slabs)
            with torch.no_grad():
                fake_cls = self.D.C(fake_slab, fake_region)
            loss = loss + F.cross_entropy(real_cls.float(), c)
        elif c is not None and real_cls is not None:
            loss = loss + F.cross_entropy(real_cls.float(), c) + F.cross_entropy(fake_cls.float(), c)
        if c is not None and real_cls is not None:
            # how often the class term's classifier names the class: real ~ fake is what a conditional G
            # should reach; fake near 1 with real near chance is G writing a code that D reads (README)
            stats["cls_real"] = (real_cls.detach().argmax(1) == c).float().mean()
            stats["cls_fake"] = (fake_cls.detach().argmax(1) == c[:len(fake_cls)]).float().mean()
        if lecam is not None:
            penalty = lecam_penalty(real, fake, *lecam[1:])
            loss = loss + lecam[0] * penalty
            stats["LeCam"] = penalty.detach()
        if r1:
            penalty = r1_penalty(real, x_slab, x_low)
            loss = loss + r1 * penalty
            stats["R1"] = penalty.detach()
        return loss, stats

    def loss_G(self, r, z, c=None, lambda_class=0.1, aug=None, lambda_div=0.0, div_real=0.0, lambda_rec=0.0,
               real=None):
        """Eqs. 4-5 for G^A, G^H, G^L [+ lambda_class times eq. 9's fake term, as officially; C's with class_window,
        minus C_twin's with class_twin (TAC-GAN, Gong et al. 2019: together they pull G's class-conditional
        distributions towards the real ones, where C's term alone favours the slabs C is surest of)]
        [+ lambda_div times the diversity hinge, beyond the paper: while the batch's low-res volumes are
        less spread (mean pairwise L1) than real ones (div_real), G is pushed to spread them]
        [+ lambda_rec times G's reconstruction term, beyond the paper: real = (x, x_slab, x_low), a batch of whole
        real volumes, their slabs at r and low-res versions; G redraws each from its code Z-hat = E(x), scaled to
        the prior's radius, L1 on the slab and the low-res volume as in eq. 7. E is frozen here and gets no
        gradient; c, when given, is the real volumes' class as well as z's]."""
        fake_slab, fake_low = self.G(z, r, c)
        logit, cls = self.D(*_swap(augment(fake_slab, fake_low, r, aug), r))
        loss, stats = _bce(logit, 1.0), {}
        if c is not None and self.D.C is not None:
            fake_region = self.D.C.region(fake_slab)
            cls = self.D.C(fake_slab, fake_region)
        if c is not None and cls is not None:
            loss = loss + lambda_class * F.cross_entropy(cls.float(), c)
        if c is not None and self.D.C_twin is not None:
            loss = loss - lambda_class * F.cross_entropy(self.D.C_twin(fake_slab, fake_region).float(), c)
        if lambda_div > 0 and len(z) > 1:
            spread = pairwise_l1(fake_low.float()) / div_real  # 1 = as spread as the real volumes
            loss = loss + lambda_div * F.relu(1 - spread)
            stats["div"] = spread.detach()
        if lambda_rec > 0:
            x, x_slab, x_low = real
            z_hat = self.encode(x)  # (B,latent_dim), without gradients
            # on the shell where N(0, I)'s draws lie (radius ~sqrt(latent_dim)): the codes G learns to redraw real
            # volumes from are codes the prior gives, so every real volume gets a region of z that renders it
            z_hat = z_hat * (self.cfg.latent_dim ** 0.5 / z_hat.norm(dim=1, keepdim=True).clamp_min(1e-6))
            rec_slab, rec_low = self.G(z_hat, r, c)
            l1 = _rec_l1(rec_slab, rec_low, x_slab, x_low)
            loss = loss + lambda_rec * l1
            stats["rec_G"] = l1.detach()
        return loss, stats

    def loss_E_H(self, x_slab, lambda1=5.0, c=None):
        """Eq. 6: a real slab through E^H and back through G^H, L1 (g_class: G^H of the slab's class c)."""
        rec = self.G.G_H(self.E_H(x_slab), c=c)
        l1 = F.l1_loss(rec.float(), x_slab.float())
        return lambda1 * l1, dict(rec_E_H=l1.detach())

    def loss_E_G(self, A_hat, x_slab, x_low, r, c=None, lambda2=5.0):
        """Eq. 7: Z-hat = E^G(A-hat) through G, L1 on the slab at r and on the low-res volume
        (averaged: _rec_l1). A-hat comes from encode_A, without gradients."""
        rec_slab, rec_low = self.G(self.E_G(A_hat), r, c)
        l1 = _rec_l1(rec_slab, rec_low, x_slab, x_low)
        return lambda2 * l1, dict(rec_E_G=l1.detach())

    # -------------------------------------------------------------------------
    # the official batmanlab/HA-GAN checkpoints

    @classmethod
    def from_official(cls, G, D=None, E=None, Sub_E=None, img_size=None, **kwargs):
        """Load official checkpoint files (G_iterN.pth etc.: {'model': state_dict, 'optimizer': ...},
        keys possibly 'module.'-prefixed). img_size defaults to what D/Sub_E reveal, else 256; the
        official 128 and 256 generators have identical weights and differ only in upsampling."""
        sds = {k: _official_state_dict(p, k) for k, p in dict(G=G, D=D, E=E, Sub_E=Sub_E).items() if p}
        g = sds["G"]
        if "fc1.weight" not in g or "tp_conv1.weight" not in g:
            raise ValueError(f"{G}: not an official HA-GAN Generator checkpoint (no fc1/tp_conv1 weights)")
        if img_size is None:
            if "D" in sds:
                img_size = 256 if "conv1.weight" in sds["D"] else 128
            elif "Sub_E" in sds:
                img_size = 256 if "conv1.weight" in sds["Sub_E"] else 128
            else:
                img_size = 256
        num_classes = sds["D"]["fc2_class.weight"].shape[0] if "D" in sds and "fc2_class.weight" in sds["D"] else 0
        latent_dim = g["fc1.weight"].shape[1] - num_classes
        cfg = HAGANConfig(img_size=img_size, latent_dim=latent_dim, num_classes=num_classes, **kwargs)
        model = cls(cfg)
        for k, sd in sds.items():
            target = dict(G=model.G, D=model.D, E=model.E_H, Sub_E=model.E_G)[k]
            mapped = {}
            for key, v in sd.items():
                mapped[_official_key(k, key, target)] = v
            ref = target.state_dict()
            missing = sorted(set(ref) - set(mapped))
            missing += [f"(unexpected {k.lstrip('?')})" for k in sorted(set(mapped) - set(ref))]
            bad = [f"{key} {tuple(mapped[key].shape)} vs {tuple(ref[key].shape)}"
                   for key in ref if key in mapped and mapped[key].shape != ref[key].shape]
            src = dict(G=G, D=D, E=E, Sub_E=Sub_E)[k]
            if missing or bad:
                raise ValueError(f"{src}: does not fit an official HA-GAN {k} at img_size {img_size}, "
                                 f"latent {latent_dim}, {num_classes} classes: "
                                 + (f"missing {missing[:3]} " if missing else "") + (f"shape {bad[:3]}" if bad else ""))
            target.load_state_dict(mapped)
        return model


def _swap(pair, r):  # (slab, low), r -> the Discriminator's argument order (slab, r, low)
    return pair[0], r, pair[1]


def r1_penalty(logits, *inputs):
    """R1: the squared norm of d(logits)/d(inputs), all inputs together, per sample, batch-averaged.
    The inputs must require grad; the graph is kept, so the penalty trains D."""
    grads = torch.autograd.grad(logits.float().sum(), inputs, create_graph=True)
    return sum(g.float().square().flatten(1).sum(1) for g in grads).mean()


def lecam_penalty(real, fake, anchor_real, anchor_fake):
    """LeCam (Tseng et al. 2021), beyond the paper: D's logits on real inputs above the moving average of
    its logits on fakes, and on fakes below that on reals, squared and batch-averaged. It holds D's
    scores of real and fake volumes near each other, so that a D shown ~100 volumes cannot drive them apart."""
    return (F.relu(real.float() - anchor_fake).square().mean()
            + F.relu(anchor_real - fake.float()).square().mean())


# -----------------------------------------------------------------------------
# differentiable augmentation of D's inputs (DiffAugment, Zhao et al. 2020; ADA, Karras et al. 2020),
# beyond the paper, for small datasets. One draw covers a (slab, low-res) pair as one volume: the same
# intensity change, the same in-plane shift (4x as many voxels in high-res) and the same cut-out box,
# placed in the whole volume. Nothing moves along the slab axis, where r says where a slab is, so
# augmenting a volume and then cutting slab r equals cutting slab r and augmenting it with r.

AUGMENTS = ("color", "translation", "cutout")


def augment_params(batch_size, low_shape, ops, p, generator=None):
    """Random parameters for `augment`, CPU tensors: each op of `ops` (a subset of AUGMENTS) applies
    to each sample with probability p. low_shape = the low-res grid (D/4, H/4, W/4)."""
    if set(ops) - set(AUGMENTS):
        raise ValueError(f"unknown augmentation {sorted(set(ops) - set(AUGMENTS))}: use some of {', '.join(AUGMENTS)}")
    B, (d, h, w) = batch_size, low_shape

    def on():
        return torch.rand(B, generator=generator) < p

    P = {}
    if "color" in ops:  # ADA's brightness N(0, 0.2) and contrast 2^N(0, 0.5), about the window's middle
        P["brightness"] = torch.randn(B, generator=generator) * 0.2 * on()
        P["contrast"] = torch.exp2(torch.randn(B, generator=generator) * 0.5 * on())
    if "translation" in ops:  # in-plane, up to 1/8 of the extent (DiffAugment), in low-res voxels
        dy = torch.randint(-(h // 8), h // 8 + 1, (B,), generator=generator)
        dx = torch.randint(-(w // 8), w // 8 + 1, (B,), generator=generator)
        P["shift"] = torch.stack([dy, dx], 1) * on()[:, None]
    if "cutout" in ops:  # a box of half the volume's extent on each axis, anywhere; empty where off
        size = torch.tensor([d // 2, h // 2, w // 2])
        lo = (torch.rand(B, 3, generator=generator) * (torch.tensor([d, h, w]) - size + 1)).long()
        P["box"] = torch.cat([lo, lo + size], 1) * on()[:, None]
    return P


def augment(slab, low, r, params):
    """(slab (B,1,D/num_slabs,H,W) starting at A-slice r, low (B,1,D/4,H/4,W/4)) -> the pair augmented
    with `params` from augment_params. Differentiable in both; None or {} is the identity. r=None:
    `slab` is the whole volume."""
    if not params:
        return slab, low
    if "brightness" in params:
        b = params["brightness"].to(slab.device, slab.dtype).view(-1, 1, 1, 1, 1)
        c = params["contrast"].to(slab.device, slab.dtype).view(-1, 1, 1, 1, 1)
        slab, low = slab * c + b, low * c + b
    if "shift" in params:
        shift = params["shift"].tolist()
        slab, low = _shift_plane(slab, [(4 * a, 4 * b) for a, b in shift]), _shift_plane(low, shift)
    if "box" in params:
        box = params["box"].to(slab.device)
        slab = slab * _outside(slab.shape, 4 * box, 4 * (r or 0)).to(slab.dtype)  # slab r starts at voxel 4r
        low = low * _outside(low.shape, box, 0).to(low.dtype)
    return slab, low


def _shift_plane(x, shifts, fill=-1.0):
    """Shift each sample of (B,C,D,H,W) in-plane by its (dy, dx) voxels; what comes in is air (-1)."""
    m = max(max(abs(a), abs(b)) for a, b in shifts)
    if m == 0:
        return x
    H, W = x.shape[-2:]
    xp = F.pad(x, (m, m, m, m), value=fill)
    return torch.stack([xp[i, :, :, m - a:m - a + H, m - b:m - b + W] for i, (a, b) in enumerate(shifts)])


def _outside(shape, box, depth0):
    """(B,1,D,H,W) mask, False inside each sample's box [lo, hi): box (B,6) in whole-volume voxels,
    the tensor's depth starting at voxel depth0."""
    D, H, W = shape[2:]
    dev = box.device

    def inside(coord, k):  # (B, n)
        return (coord[None] >= box[:, k, None]) & (coord[None] < box[:, k + 3, None])

    ins = (inside(torch.arange(depth0, depth0 + D, device=dev), 0)[:, :, None, None]
           & inside(torch.arange(H, device=dev), 1)[:, None, :, None]
           & inside(torch.arange(W, device=dev), 2)[:, None, None, :])
    return ~ins[:, None]


def pairwise_l1(v):
    """(b, ...) -> the mean L1 distance over the b(b-1)/2 distinct pairs: how spread a batch is. A row at a
    time, so memory stays that of the batch at any size."""
    v = v.flatten(1)
    b = len(v)
    return sum((v[i + 1:] - v[i]).abs().mean(1).sum() for i in range(b - 1)) / (b * (b - 1) / 2)


def _rec_l1(rec_slab, rec_low, x_slab, x_low):
    # eq. 7's reconstruction error: the slab's L1 and the low-res volume's, averaged as the official code does
    return (F.l1_loss(rec_slab.float(), x_slab.float()) + F.l1_loss(rec_low.float(), x_low.float())) / 2


def _bce(logit, target):
    # losses reduced in float32 whatever the autocast dtype
    logit = logit.float()
    return F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, target))


def _official_state_dict(path, what):
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from None
    sd = ck.get("model", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: not an official HA-GAN {what} checkpoint (expected a dict with 'model')")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _official_key(net, key, target):
    """Official parameter name -> ours within the matching module."""
    if key.startswith("fc2_class."):  # D^H's class head
        key = key.replace("fc2_class.", "fc_class.")
    m = re.fullmatch(r"(sub_[GD]\.)?([a-z_]+?)(\d+)?\.(weight|bias|u0|sv0)", key)
    if not m:
        return f"?{key}"  # not an official name: the caller reports it as unexpected
    sub, name, i, p = m.group(1) or "", m.group(2), int(m.group(3) or 0), m.group(4)
    p = {"u0": "u", "sv0": "sigma"}.get(p, p)
    if net == "G":
        if sub == "sub_G.":
            return f"G_L.{'conv' if name == 'tp_conv' else 'norm'}{i}.{p}"
        if name == "fc":
            return f"G_A.fc.{p}"
        if i <= 5:
            return f"G_A.{'convs' if name == 'tp_conv' else 'norms'}.{i - 1}.{p}"
        return f"G_H.{'conv' if name == 'tp_conv' else 'norm'}{i - 5}.{p}"
    if net == "D":
        if sub == "sub_D.":  # official conv{5 - n}..conv4, then conv5 = head
            n = len(target.D_L.convs)
            return f"D_L.head.{p}" if i == 5 else f"D_L.convs.{i - (5 - n)}.{p}"
        if name == "fc_class":
            return f"D_H.fc_class.{p}"
        if name == "fc":
            return f"D_H.fc{i}.{p}"
        n = len(target.D_H.convs)  # official conv{8 - n}..conv7
        return f"D_H.convs.{i - (8 - n)}.{p}"
    if net == "E":
        return f"{'conv' if name == 'conv' else 'norm'}{i}.{p}"
    # Sub_E: official conv{5 - n}..conv4 with bn of the same number, then conv5 = head
    n = len(target.convs)
    if name == "conv" and i == 5:
        return f"head.{p}"
    return f"{'convs' if name == 'conv' else 'norms'}.{i - (5 - n)}.{p}"


# -----------------------------------------------------------------------------
# our checkpoints (train.py writes them; sample.py, encode.py and eval.py read them)


def model_config(args, path):
    """HAGANConfig from a checkpoint's model_args; a one-line ValueError for keys this code does not know
    (a checkpoint from a newer version) or values it cannot build."""
    args = dict(args)
    unknown = sorted(set(args) - {f.name for f in fields(HAGANConfig)})
    if unknown:
        raise ValueError(f"{path}: model_args {', '.join(unknown)} are unknown to this code (a checkpoint from a "
                         f"newer hagan?); update this code (git pull) to load it")
    if isinstance(args.get("img_size"), list):
        args["img_size"] = tuple(args["img_size"])
    try:
        return HAGANConfig(**args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: model_args cannot be built ({e})") from None


def read_checkpoint(path, mmap=False):
    """A train.py checkpoint as a dict; a one-line ValueError for a missing, truncated, empty or foreign file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no checkpoint there (train one with: python train.py config/train_demo.py)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04":  # torch.save writes a zip archive
            raise ValueError("an empty file" if not head else "not a file that torch.save wrote")
        # mmap: tensors are read from the file as load_state_dict copies them, not held twice
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except ValueError as e:
        raise ValueError(f"{path}: unreadable checkpoint: {e}") from None
    except Exception as e:  # torch's own words, up to the end of their first sentence
        why = re.split(r"\. |\n", str(e).strip())[0][:120]
        raise ValueError(f"{path}: unreadable checkpoint: truncated or damaged ({why})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"{path}: not a hagan checkpoint (no 'model'/'model_args')")
    return ckpt


def load_checkpoint(path, device="cpu", ema=True):
    """(model, ckpt) from a train.py checkpoint, G's weights replaced by their moving average when
    the checkpoint has one and ema=True. One-line ValueError for a missing or foreign file."""
    ckpt = read_checkpoint(path, mmap=True)
    model = HAGAN(model_config(ckpt["model_args"], path))
    try:
        model.load_state_dict(ckpt["model"])
        if ema and ckpt.get("ema_G"):
            model.G.load_state_dict(ckpt["ema_G"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the checkpoint's model_args "
                         f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    return model.to(device).eval(), ckpt


def pick_device(name):
    """'auto' -> 'cuda' if available else 'cpu'; a one-line ValueError for a device this torch cannot use."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name}: not a torch device (use cpu, cuda, cuda:1, ... or auto)") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"--device={name}: this torch ({torch.__version__}) is a CPU-only build; "
                             f"use --device=cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device={name}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                             f"use --device=cpu or another index")
    elif dev.type != "cpu" and not getattr(torch, dev.type, None):
        raise ValueError(f"--device={name}: not available in this torch; use cpu or cuda")
    return name


def autocast_ctx(device, dtype):
    """autocast for 'bfloat16'/'float16', nothing for 'float32' (also on CPU, so tests exercise bf16)."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# configuration overrides shared by every script: config files and --key=value / --key value


def fail(msg):
    """Exit with the one line 'error: msg' on stderr. Under torchrun only rank 0 says it, and also leaves it
    in torchrun's error file, so that torchrun's own failure report (a launcher traceback and a table of
    exit codes, which we cannot silence) names the cause; every other rank exits with status 1, silently."""
    if int(os.environ.get("RANK", 0)) != 0:
        raise SystemExit(1)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # set by torchrun for each of its processes
        try:
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump(dict(message=dict(message=f"error: {msg}", extraInfo=dict(
                    py_callstack=f"error: {msg}", timestamp=str(int(time.time()))))), f)
        except OSError:
            pass  # the line on stderr is what matters
    raise SystemExit(f"error: {msg}")


def _tb_frames(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def override(config, argv=None, given=None):
    """Apply `config/*.py` files and `--key=value` or `--key value` arguments to the dict `config`, in
    order. Config files are executed as Python (as nanoGPT's are), in an empty namespace: trust them as
    you trust code. Only keys of `config` may be set, no typos. The default's type is the schema: an int
    may become a float, nothing else changes type; '' and -1 defaults are the 'not given' sentinels. A
    list-valued key repeats on the command line (--input=a --input=b). `given`, a set, collects the keys
    that were set. Exits with one line on error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    given = set() if given is None else given

    def setkey(k, v, where):
        if k not in config:
            close = [c for c in config if c.startswith(k[:3])][:3]
            fail(f"unknown config key '{k}' in {where}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                 + f"; known keys: {', '.join(config)}")
        d = config[k]
        if isinstance(d, bool) and not isinstance(v, bool):
            fail(f"{where}: {k} must be True or False, got {v!r}")
        if isinstance(d, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if isinstance(d, (list, tuple)) and isinstance(v, (list, tuple)):
            v = type(d)(v)
        if isinstance(d, int) and isinstance(v, (list, tuple)) and k == "img_size":
            pass  # img_size: S or (D, H, W)
        elif type(v) is not type(d):
            fail(f"{where}: {k} must be {type(d).__name__} like its default {d!r}, got {v!r}")
        config[k] = v
        given.add(k)

    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                fail(f"{arg}: no such config file")
            ns = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), ns)
            except Exception as e:  # it is Python: report where it broke, in one line
                line = getattr(e, "lineno", None) or next((t.tb_lineno for t in _tb_frames(e.__traceback__)
                                                           if t.tb_frame.f_code.co_filename == arg), "?")
                fail(f"{arg}, line {line}: {type(e).__name__}: {getattr(e, 'msg', None) or e}")
            for k, v in ns.items():
                if not k.startswith("_") and not callable(v) and not isinstance(v, type(os)):
                    setkey(k, v, arg)
            i += 1
            continue
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            i += 1
        else:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and key in config
                                      and isinstance(config[key], bool)):
                val, i = "True", i + 1  # a bare boolean flag: --overwrite
            else:
                val, i = argv[i + 1], i + 2
        try:
            v = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            v = val  # a plain string such as a path
        if key in config and isinstance(config[key], str) and not isinstance(v, str):
            v = val  # '--out=123' is still a path
        if key in config and isinstance(config[key], list) and not isinstance(v, list):
            v = config[key] + [val]  # one more value of a repeatable option
        setkey(key, v, f"--{key}")
    return config
