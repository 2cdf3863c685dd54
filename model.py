"""
HA-GAN's networks and losses. Hierarchical Amortized GAN (Sun et al., IEEE JBHI 2022,
https://ieeexplore.ieee.org/document/9770375); names follow the paper (Table I):

    G^A  G.G_A   z[, c] -> A, 64 channels on the (S/4)^3 grid      D^H  D.D_H   (high-res slab, its start r) -> logit
    G^L  G.G_L   A -> low-res volume X^L on the same grid         D^L  D.D_L   low-res volume -> logit
    G^H  G.G_H   a slab of A -> high-res slab; all of A -> S^3    E^H  E_H     high-res slab -> its slice of A-hat
                                                                  E^G  E_G     A-hat (every slab's) -> Z-hat

The official code (github.com/batmanlab/HA-GAN) calls these Generator (G^A + G^H, sub_G = G^L), Discriminator
(D^H, sub_D = D^L), Encoder (E^H) and Sub_Encoder (E^G). At width 1 our modules have its layers, so its
checkpoints load (HAGAN.from_official). The same rule builds S = 32..512 and non-cubic (D, H, W) volumes.
"""

import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

GN_GROUPS = 8  # GroupNorm's groups in G and E (official); every channel count is a multiple of it
OUT_SCALE = 1.1  # g_out 'scaled'/'clipped': G's outputs are OUT_SCALE * tanh
STATS_CHUNK = 2 ** 24  # slab_context: at most this many elements of conv1's output at a time for G^H's statistics

# -----------------------------------------------------------------------------
# configuration


@dataclass
class HAGANConfig:
    img_size: object = 256  # S, or a (D, H, W) triple; every dim a multiple of 32; D is the slab axis
    latent_dim: int = 1024  # size of Z
    num_classes: int = 0  # 0 = unconditional; > 0 adds a one-hot c to G^A's input and the class term
    width: float = 1.0  # multiplies every channel count (1/8 gives CPU-sized models)
    g_channels: int = 32  # official Generator `channel`: G^A goes 16x -> 2x this (A = 64 channels)
    dh_channels: int = 512  # official Discriminator `channel` (D^H)
    dl_channels: int = 256  # official Sub_Discriminator `channel` (D^L)
    eg_channels: int = 256  # official Sub_Encoder `channel` (E^G)
    num_slabs: int = 8  # the depth axis is cut into this many slabs (paper: 8); G^H and D^H train on one
    # beyond the paper (README, "Options"); the defaults are the official networks
    slab_context: bool = False  # G^H trains on a slab as G^H(A) renders it: whole-volume norm statistics, a halo
    mbstd_group: int = 0  # > 0: D^H and D^L see the minibatch standard deviation over groups of this size
    d_width: float = 0.0  # > 0: the discriminators' channel multiplier instead of width
    g_out: str = "tanh"  # G's output: 'tanh' (official), 'scaled' (OUT_SCALE * tanh), 'clipped' (scaled, clipped)
    g_noise: bool = False  # G^H adds per-voxel noise, a function of z, before its last conv
    g_pad: str = "zeros"  # G^H's conv padding: 'zeros' (official) or 'replicate'
    g_class: bool = False  # conditional: a per-class gain and bias in G^H's norm
    d_stretch: float = 0.0  # > 0: D^H sees intensities stretched near air (slope 1 + d_stretch at -1)
    class_window: tuple = ()  # conditional: (lo, hi[, top]) in [-1, 1]: the class term from a classifier C of
    # real slabs on that window (SlabClassifier), not from D's AC-GAN heads
    class_twin: bool = False  # with class_window: G's class term is C's minus a twin's trained on G's slabs

    def __post_init__(self):
        s = self.img_size
        s = (s, s, s) if isinstance(s, int) else tuple(int(d) for d in s)
        if not (len(s) == 3 and all(d >= 32 and d % 32 == 0 for d in s) and max(s) <= 512):
            raise ValueError(f"img_size {self.img_size!r} cannot be built: use S in 32, 64, 128, 256, 512, "
                             f"or a (D, H, W) triple whose dims are multiples of 32 between 32 and 512")
        self.img_size = s[0] if s[0] == s[1] == s[2] else s
        if self.latent_dim < 1 or self.num_classes < 0 or self.width <= 0 or self.d_width < 0 or self.d_stretch < 0:
            raise ValueError("latent_dim must be >= 1, num_classes >= 0, width > 0, d_width >= 0, d_stretch >= 0")
        self.class_window = w = tuple(float(v) for v in self.class_window)
        if w and not (len(w) in (2, 3) and -1 <= w[0] and w[-1] <= 1 and all(a < b for a, b in zip(w, w[1:]))):
            raise ValueError(f"class_window={w}: use () or (lo, hi[, top]) with -1 <= lo < hi < top <= 1")
        if (self.class_window or self.g_class) and not self.num_classes:
            raise ValueError("class_window and g_class are for class-conditional models: set num_classes too")
        if self.class_twin and not self.class_window:
            raise ValueError("class_twin is the twin of class_window's classifier C: set class_window too")
        for k, ok in (("g_out", ("tanh", "scaled", "clipped")), ("g_pad", ("zeros", "replicate"))):
            if getattr(self, k) not in ok:
                raise ValueError(f"{k}={getattr(self, k)!r}: use one of {', '.join(ok)}")
        if self.num_slabs < 1 or s[0] // 4 % self.num_slabs:
            raise ValueError(f"num_slabs={self.num_slabs} must divide A's depth {s[0] // 4} (the volume's depth / 4)")

    @property
    def shape(self):  # (D, H, W) of the full-resolution volume
        s = self.img_size
        return (s, s, s) if isinstance(s, int) else tuple(s)

    @property
    def a_shape(self):  # grid of A and of the low-res volume
        return tuple(d // 4 for d in self.shape)

    @property
    def slab_a(self):  # slices of A in one training slab (S/32 with 8 slabs)
        return self.a_shape[0] // self.num_slabs

    @property
    def r_max(self):  # largest slab start on A's grid (56 at S=256 with 8 slabs)
        return self.a_shape[0] - self.slab_a

    def ch(self, n, width=0.0):  # a width-scaled channel count, a multiple of GN_GROUPS
        return max(GN_GROUPS, int(round(n * (width or self.width) / GN_GROUPS)) * GN_GROUPS)

    def ch_D(self, n):
        return self.ch(n, self.d_width)

    @property
    def ac_classes(self):  # classes of D's AC-GAN heads: none when C judges the class
        return 0 if self.class_window else self.num_classes


# -----------------------------------------------------------------------------
# the selectors S^L and S^H (eqs. 3-7). r is the slab start on A's grid and the high-res slab starts at 4r, so
# a real and a generated slab for the same r cover the same voxels (the official code draws r per voxel and
# crops A at r//4, which misaligns them).


def slab_range(r, depth, num_slabs):
    """High-res voxel range [start, stop) along D of slab r, for a volume of depth `depth`."""
    n = depth // num_slabs
    r_max = depth // 4 - n // 4
    if not 0 <= r <= r_max:
        raise ValueError(f"slab start r={r} outside [0, {r_max}] for depth {depth} in {num_slabs} slabs")
    return 4 * r, 4 * r + n


def S_L(A, r, num_slabs):
    """S^L(A; r): the slices of A that G^H lifts to slab r. (B,C,D/4,h,w) -> (B,C,D/4/num_slabs,h,w)"""
    return A[:, :, r:r + A.shape[2] // num_slabs]


def S_H(X, r, num_slabs):
    """S^H(X; r): slab r of whole volumes. (B,1,D,H,W) -> (B,1,D/num_slabs,H,W); r=None: all of X."""
    if r is None:
        return X
    a, b = slab_range(r, X.shape[2], num_slabs)
    return X[:, :, a:b]


# -----------------------------------------------------------------------------
# spectral normalisation (Miyato et al. 2018), one power iteration per training forward as in the official
# layers. Sigma is computed in float32 with autocast off: in bf16/fp16 the normalisation (eps=1e-12) underflows.
# D's update judges the real and the fake batch in two calls, so each gets its own iteration and sigma, as
# officially: one W / sigma shared by both (or one call on both batches) changes how D trains.


def _no_autocast(t):
    return torch.autocast("cpu" if t.device.type == "meta" else t.device.type, enabled=False)


def _sn_weight(m):
    W = m.weight.flatten(1)  # (out, in*k*k*k)
    with _no_autocast(W):
        W = W.float()
        with torch.no_grad():
            v = F.normalize(m.u @ W, dim=1, eps=1e-12)  # (1, in*k^3)
        wv = v @ W.t()  # (1, out); the gradient flows through W only
        u = F.normalize(wv.detach(), dim=1, eps=1e-12)
        sigma = (wv * u).sum()
        if m.training:
            m.u.copy_(u)
            m.sigma.copy_(sigma.detach())
    return m.weight / sigma.to(m.weight.dtype)


def _sn_buffers(m, n_out):  # the power iteration's vector, and sigma for logging (the official u0, sv0)
    m.register_buffer("u", F.normalize(torch.randn(1, n_out), dim=1))
    m.register_buffer("sigma", torch.ones(1))


class SNConv3d(nn.Conv3d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _sn_buffers(self, self.out_channels)

    def forward(self, x):
        return self._conv_forward(x, _sn_weight(self), self.bias)


class SNLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _sn_buffers(self, self.out_features)

    def forward(self, x):
        return F.linear(x, _sn_weight(self), self.bias)


# -----------------------------------------------------------------------------
# the official nearest 2x upsampling followed by a 3^3 conv (padding 1), as one stride-2 transposed 4^3 conv.
# Along one axis, row 2i of conv(up(x)) is x[i-1] w0 + x[i] (w1 + w2) and row 2i+1 is x[i] (w0 + w1) + x[i+1] w2:
# a transposed conv with taps (w2, w1 + w2, w0 + w1, w0). In 3D the 4^3 kernel is the product of three such sums
# of the stored 3^3 weights (checkpoints are unchanged): 64 instead of 8 x 27 multiply-adds per input voxel, and
# no upsampled copy of the input.

_UP_TAPS = torch.tensor([[0., 0., 1.], [0., 1., 1.], [1., 1., 0.], [1., 0., 0.]])  # (4 taps, 3 weights)
_UP_3D = torch.kron(torch.kron(_UP_TAPS, _UP_TAPS), _UP_TAPS).t()  # (27, 64)
_up_3d = {}  # _UP_3D on each (device, dtype) in use


def up_weight(w):
    """A 3^3 conv's weight (out, in, 3, 3, 3) -> the transposed conv's (in, out, 4, 4, 4), in w's dtype."""
    m = _up_3d.get((w.device, w.dtype))
    if m is None:
        m = _up_3d[w.device, w.dtype] = _UP_3D.to(w.device, w.dtype)
    with _no_autocast(w):
        return (w.flatten(2) @ m).unflatten(2, (4, 4, 4)).transpose(0, 1)


def up_conv(conv, x, rows=None):
    """conv(F.interpolate(x, scale_factor=2)) for a 3^3 conv with padding 1 ('zeros' or 'replicate'), through
    up_weight. rows=(x0, n, a, b): x holds rows [x0, x0 + x.shape[2]) along depth of a whole input of depth n, and
    the result is rows [2a, 2b) of the whole output (a chunked render)."""
    K = up_weight(conv.weight)
    if rows is None and conv.padding_mode == "zeros":
        return F.conv_transpose3d(x, K, conv.bias, stride=2, padding=1)
    x0, n, a, b = rows or (0, x.shape[2], 0, x.shape[2])
    lo, hi = max(a - 1, 0), min(b + 1, n)  # the input rows it needs; past the ends, the conv's padding
    mode = "replicate" if conv.padding_mode == "replicate" else "constant"
    x = F.pad(x[:, :, lo - x0:hi - x0], (1, 1, 1, 1, lo - (a - 1), (b + 1) - hi), mode=mode)
    return F.conv_transpose3d(x, K, conv.bias, stride=2, padding=3)


class GroupNorm(nn.GroupNorm):
    """Under bf16/fp16 autocast, GroupNorm in the activations' dtype (autocast would make it float32, casting its
    input up and its output back for the next conv); torch's kernels keep the statistics in float32."""

    def forward(self, x):
        if x.dtype not in (torch.bfloat16, torch.float16):
            return super().forward(x)
        with _no_autocast(x):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def _halvings(dims, floor):
    """How many exact halvings of every extent keep the smallest >= floor (S=256: 4 for A's grid, 3 for D^H)."""
    k = 0
    while all(d % 2 == 0 for d in dims) and min(dims) // 2 >= floor:
        dims = [d // 2 for d in dims]
        k += 1
    return k


# -----------------------------------------------------------------------------
# generator


class G_A(nn.Module):
    """z[, one-hot c] -> A: fc to a small grid, then 5 conv-GN-ReLU blocks, nearest 2x upsampling before as many
    of them as the grid needs (4 at S=256, 3 at S=128, as officially)."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.g_channels
        chans = [cfg.ch(16 * c), cfg.ch(16 * c), cfg.ch(8 * c), cfg.ch(4 * c), cfg.ch(2 * c)]
        n_up = min(_halvings(cfg.a_shape, 4), 5)
        self.up = [i in (1, 2, 3, 4, 0)[:n_up] for i in range(5)]  # blocks 2..5 first, block 1 too at S=512
        self.base = tuple(d >> n_up for d in cfg.a_shape)
        self.num_classes = cfg.num_classes
        self.fc = nn.Linear(cfg.latent_dim + cfg.num_classes, chans[0] * math.prod(self.base))
        self.convs = nn.ModuleList(nn.Conv3d(i, o, 3, padding=1) for i, o in zip(chans[:1] + chans[:-1], chans))
        self.norms = nn.ModuleList(GroupNorm(GN_GROUPS, o) for o in chans)

    def forward(self, z, c=None):
        if self.num_classes:
            if c is None:
                raise ValueError("this model is class-conditional: pass class labels c")
            z = torch.cat([z, F.one_hot(c.long(), self.num_classes).to(z.dtype)], dim=1)
        h = self.fc(z).view(z.shape[0], -1, *self.base)  # (B,512,4,4,4) at S=256
        for up, conv, norm in zip(self.up, self.convs, self.norms):
            h = F.relu(norm(up_conv(conv, h) if up else conv(h)))  # up: (B,C,d,h,w) -> (B,C',2d,2h,2w)
        return h  # A: (B,64,S/4,S/4,S/4)


def _to_image(conv, h, g_out):
    """G's output layer, in float32 even under autocast (bf16 tanh near +-1 bands the CT window by several HU).
    g_out 'scaled': OUT_SCALE * tanh, so that air (-1) and the window's top are reached at finite inputs, where
    tanh' is not ~0; 'clipped': also clipped to the data's [-1, 1] in training, the gradient passed through as if
    unclipped (straight-through), so that any depth below -1 is air, as in the clipped scans."""
    with _no_autocast(h):
        y = torch.tanh(conv(h.to(torch.promote_types(h.dtype, torch.float32))))
        if g_out == "tanh":
            return y
        y = y * OUT_SCALE
        return y + (y.clamp(-1, 1) - y).detach() if g_out == "clipped" else y


class G_H(nn.Module):
    """A (or a slab of it) -> high-res volume: two nearest 2x upsamplings, 64 -> 32 -> 1 channels."""

    def __init__(self, cfg):
        super().__init__()
        c_a, c = cfg.ch(2 * cfg.g_channels), cfg.ch(cfg.g_channels)
        self.conv1 = nn.Conv3d(c_a, c, 3, padding=1, padding_mode=cfg.g_pad)
        self.norm1 = GroupNorm(GN_GROUPS, c)
        self.conv2 = nn.Conv3d(c, 1, 3, padding=1, padding_mode=cfg.g_pad)
        self.g_out = cfg.g_out
        # g_noise: the noise's strength in each of conv2's input channels, learned from 0 (StyleGAN's noise inputs)
        self.noise_scale = nn.Parameter(torch.zeros(c)) if cfg.g_noise else None
        # g_class: a per-class (gain, bias) on norm1's output, learned from 0 (BigGAN's conditional norm)
        self.class_affine = nn.Embedding(cfg.num_classes, 2 * c) if cfg.g_class else None
        if self.class_affine is not None:
            nn.init.zeros_(self.class_affine.weight)

    def modulation(self, c):
        """g_class: per-sample (1 + gain, bias), each (B,C); None without it or without c."""
        if self.class_affine is None or c is None:
            return None
        g, b = self.class_affine(c.long()).chunk(2, 1)
        return 1 + g, b

    def forward(self, a, c=None, stats=None, noise=None):  # (B,64,d,h,w) -> (B,1,4d,4h,4w)
        """stats: norm1's (mean, 1/std), each (B, groups), to use instead of a's own (slab_context: the whole
        volume's, G_H.stats). noise: (B,1,4d,4h,4w) from Generator.noise (g_noise). c: class labels (g_class)."""
        h = up_conv(self.conv1, a)  # (B,32,2d,2h,2w)
        if stats is None:
            h = self.norm1(h)
        else:
            B, C, G = h.shape[0], h.shape[1], self.norm1.num_groups
            mean, rstd = (s.to(h.dtype)[:, :, None] for s in stats)
            h = ((h.reshape(B, G, -1) - mean) * rstd).view(h.shape)
            h = h * self.norm1.weight.view(1, C, 1, 1, 1) + self.norm1.bias.view(1, C, 1, 1, 1)
        if (mod := self.modulation(c)) is not None:
            h = h * mod[0].to(h.dtype)[:, :, None, None, None] + mod[1].to(h.dtype)[:, :, None, None, None]
        return _to_image(lambda t: self.out_conv(t, noise), F.relu(h), self.g_out)

    def out_conv(self, h, noise=None, rows=None):
        """conv2(up(h) + noise * noise_scale), rows as in up_conv; noise holds the output rows from 2 * rows[0]. The
        noise's part, by linearity: one 3^3 conv of the one-channel noise with conv2's weights summed over the
        channels by noise_scale."""
        y = up_conv(self.conv2, h, rows)  # (B,1,2d,2h,2w)
        if noise is None or self.noise_scale is None:
            return y
        x0, n, a, b = rows or (0, h.shape[2], 0, h.shape[2])
        w = (self.conv2.weight * self.noise_scale.view(1, -1, 1, 1, 1)).sum(1, keepdim=True)  # (1,1,3,3,3)
        return y + _depth_conv(noise.to(y.dtype), w.to(y.dtype), self.conv2.padding_mode, 2 * x0, 2 * n, 2 * a, 2 * b)

    @torch.no_grad()
    def stats(self, A, chunk, keep=None):
        """norm1's statistics over the whole volume G^H(A): (mean, 1/std), each (B, groups). conv1's output is made
        `chunk` slices of A at a time and the statistics merged (Chan et al., float64), so memory stays that of
        one chunk; `keep`, if given, receives conv1's whole output."""
        n, ny, G = A.shape[2], 2 * A.shape[2], self.norm1.num_groups
        mean = m2 = None
        cnt = 0
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            lo, hi = max(a - 1, 0), min(b + 1, n)
            y = up_conv(self.conv1, A[:, :, lo:hi], (lo, n, a, b))  # (B,32,2k,2h,2w)
            if keep is not None:
                keep[:, :, 2 * a:2 * b] = y
            yg = y.reshape(y.shape[0], G, -1)
            v, mu = torch.var_mean(yg.to(torch.promote_types(yg.dtype, torch.float32)), dim=2, correction=0)
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
        c_a, c, c2 = cfg.ch(2 * cfg.g_channels), cfg.ch(cfg.g_channels), cfg.ch(cfg.g_channels // 2)
        self.conv1 = nn.Conv3d(c_a, c, 3, padding=1)
        self.norm1 = GroupNorm(GN_GROUPS, c)
        self.conv2 = nn.Conv3d(c, c2, 3, padding=1)
        self.norm2 = GroupNorm(GN_GROUPS, c2)
        self.conv3 = nn.Conv3d(c2, 1, 3, padding=1)
        self.g_out = cfg.g_out

    def forward(self, a):  # (B,64,S/4,S/4,S/4) -> (B,1,S/4,S/4,S/4)
        h = F.relu(self.norm1(self.conv1(a)))
        h = F.relu(self.norm2(self.conv2(h)))
        return _to_image(self.conv3, h, self.g_out)


class Generator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.G_A, self.G_L, self.G_H = G_A(cfg), G_L(cfg), G_H(cfg)

    def forward(self, z, r, c=None):
        """Training forward, eqs. 2-3: (X^H_r = G^H(S^L(A; r)) (B,1,D/num_slabs,H,W), X^L = G^L(A) (B,1,D/4,H/4,W/4)).
        Only A's slab r goes through G^H. r=None lifts all of A (the non-amortised model of eval.py --bench)."""
        A = self.G_A(z, c)
        n = self.cfg.slab_a
        if r is None or not self.cfg.slab_context:
            lo, hi = (0, A.shape[2]) if r is None else (r, r + n)
            a = A if r is None else S_L(A, r, self.cfg.num_slabs)
            return self.G_H(a, c, noise=self.noise(z, 4 * lo, 4 * hi)), self.G_L(A)
        # slab_context: D^H judges exactly slab r of the volume that G^H(A) renders at inference, which the official
        # G^H does not (it normalises a slab by its own statistics and zero-pads its ends): the whole volume's
        # statistics (no gradient through them) and one slice of A either side, cropped off after G^H
        lo, hi = max(r - 1, 0), min(r + n + 1, A.shape[2])
        k = max(n, STATS_CHUNK // (A[:, :1, :1].numel() * 8 * self.G_H.conv1.out_channels))  # A's slices a pass
        x = self.G_H(A[:, :, lo:hi], c, self.G_H.stats(A, k), self.noise(z, 4 * lo, 4 * hi))
        return x[:, :, 4 * (r - lo):4 * (r - lo + n)], self.G_L(A)

    def noise(self, z, a, b):
        """g_noise: N(0, 1) for rows [a, b) of G^H's output, (B,1,b-a,H,W), on z's device: a hash of each sample's z
        and of each voxel's place in the whole volume, so a volume is the same however it is batched, chunked or cut
        into slabs. None without g_noise."""
        if not self.cfg.g_noise:
            return None
        H, W = self.cfg.shape[1:]
        bits = z.detach().float().contiguous().view(torch.int32).long()  # (B,L)
        seed = _mix32(_mix32(bits + 0x9E3779B1 * torch.arange(bits.shape[1], device=z.device)).sum(1))  # (B,)
        i = torch.arange(2 * a * H * W, 2 * b * H * W, device=z.device).view(b - a, H, W, 2)  # two draws a voxel
        u = (_mix32(_mix32(i) ^ seed.view(-1, 1, 1, 1, 1)) + 0.5) / 2 ** 32  # (B,b-a,H,W,2) in (0, 1)
        return (torch.sqrt(-2 * torch.log(u[..., 0])) * torch.cos(2 * math.pi * u[..., 1])).unsqueeze(1)  # Box-Muller

    @torch.no_grad()
    def generate(self, z, c=None, chunk=0):
        """Whole volumes (B,1,D,H,W): G^H on all of A (paper Fig. 2). chunk=k runs G^H k slices of A at a time
        with the same result (to float rounding) in bounded memory."""
        chunk = auto_chunk(self.cfg, len(z), 4, free_memory(z.device)) if chunk < 0 else chunk  # -1: what fits
        A = self.G_A(z, c)
        noise = self.noise(z, 0, self.cfg.shape[0])
        x = self._G_H_chunked(A, int(chunk), noise, c) if chunk else self.G_H(A, c, noise=noise)
        return x if self.cfg.g_out == "tanh" else x.clamp_(-1, 1)  # scaled outputs kept to the data's range

    def _G_H_chunked(self, A, k, noise=None, c=None):
        """G^H(A) in depth chunks of k slices of A. A first pass (G_H.stats) makes conv1's output Y chunk by chunk
        and its whole-volume GroupNorm statistics; Y (1/8 of the output's voxels at 32 channels) is kept, so the
        costliest conv runs once. Each chunk then takes one neighbouring slice of Y either side for conv2."""
        g = self.G_H
        n, ny, G = A.shape[2], 2 * A.shape[2], g.norm1.num_groups
        Y = A.new_empty(A.shape[0], g.conv1.out_channels, ny, 2 * A.shape[3], 2 * A.shape[4])
        mean, rstd = g.stats(A, k, keep=Y)
        cpg = Y.shape[1] // G
        scale = rstd.repeat_interleave(cpg, 1) * g.norm1.weight.double()  # (B,C)
        shift = g.norm1.bias.double() - mean.repeat_interleave(cpg, 1) * scale
        if (mod := g.modulation(c)) is not None:  # g_class
            scale, shift = scale * mod[0].double(), shift * mod[0].double() + mod[1].double()
        scale, shift = (t.to(Y.dtype)[:, :, None, None, None] for t in (scale, shift))  # (B,C,1,1,1)
        out = None
        for a in range(0, n, k):
            b = min(a + k, n)
            lo, hi = max(2 * a - 1, 0), min(2 * b + 1, ny)
            h = torch.addcmul(shift, Y[:, :, lo:hi], scale).relu_()  # rows [lo, hi) of conv2's input, before up
            nz = None if noise is None else noise[:, :, 2 * lo:2 * hi]
            x = _to_image(lambda t: g.out_conv(t, nz, (lo, ny, 2 * a, 2 * b)), h, g.g_out)  # (B,1,4k,H,W)
            if out is None:
                out = x.new_empty(x.shape[0], 1, 4 * n, *x.shape[3:])
            out[:, :, 4 * a:4 * b] = x
        return out


def _mix32(x):
    """A 32-bit integer hash of int64 tensors (lowbias32's shifts; multipliers below 2^31 keep products in int64)."""
    x = x & 0xFFFFFFFF
    x = (x ^ (x >> 16)) * 0x7FEB352D & 0xFFFFFFFF
    x = (x ^ (x >> 15)) * 0x6C8E9CF5 & 0xFFFFFFFF
    return x ^ (x >> 16)


def _depth_conv(x, w, padding_mode, x0, n, y0, y1):
    """Rows [y0, y1) along depth of a 3^3 conv (weight w, padding 1, no bias) of a whole input of depth n, where x
    holds its rows [x0, x0 + x.shape[2]). Rows outside [0, n) are the conv's own padding."""
    lo, hi = max(y0 - 1, 0), min(y1 + 1, n)
    mode = "replicate" if padding_mode == "replicate" else "constant"
    return F.conv3d(F.pad(x[:, :, lo - x0:hi - x0], (1, 1, 1, 1, lo - (y0 - 1), (y1 + 1) - hi), mode=mode), w)


def auto_chunk(cfg, batch, bytes_per_elem, free_bytes):
    """generate()'s chunk for `batch` volumes: 0 (all of A at once) when that render fits in free_bytes and no tensor
    passes 2**31 elements (CUDA's indexing limit), else the most slices of A per chunk that fit (at least 1).
    Conservative: conv2's input (B,C,rows,H/2,W/2) counted three times (normalised, padded, reordered by the conv
    library) and its output rows four times (float32, tanh, scaled); a chunked render also keeps conv1's whole
    output (B,C,D/2,H/2,W/2) and the volume."""
    D, H, W = cfg.shape
    c, n, V = cfg.ch(cfg.g_channels), cfg.a_shape[0], D * H * W
    for k in [0] + list(range(n, 0, -1)):
        rows = D // 2 if k == 0 else min(2 * k + 2, D // 2)  # conv2's input rows, its halo included
        big, out = batch * c * rows * H * W // 4, batch * (D if k == 0 else 4 * k) * H * W
        need = bytes_per_elem * (3 * big + 4 * out + (0 if k == 0 else batch * (c * V // 8 + V)))
        if need <= free_bytes and big < 2**31:
            return k
    return 1


def free_memory(device):
    """Bytes a render can use on `device`: the GPU's free memory and what torch's allocator holds unused, or the
    RAM the OS counts as available."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# -----------------------------------------------------------------------------
# discriminators


STRETCH_WIDTH = 0.2  # d_stretch acts within about this much of -1: 162 HU above air in the CT window


def stretch_dark(x, gain):
    """d_stretch: x + gain * w * tanh((x + 1) / w). -1 stays -1 with slope 1 + gain; from about -1 + 4w (soft
    tissue and up) values are only shifted. Lungs (-0.8 in the CT window) and air then differ more to D^H."""
    return x if gain == 0 else x + (gain * STRETCH_WIDTH) * torch.tanh((x + 1) / STRETCH_WIDTH)


def mbstd(x, group):
    """Minibatch standard deviation (Karras et al. 2018): one more channel, how much the samples of each group
    differ. Samples i, i + B/g, i + 2B/g, ... form a group. (B,C,d,h,w) -> (B,C+1,d,h,w)"""
    B = x.shape[0]
    g = min(group, B)
    while B % g:
        g -= 1
    y = x.float().view(g, B // g, *x.shape[1:])
    s = (y.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3, 4))  # (B/g,)
    return torch.cat([x, s.repeat(g).to(x.dtype).view(B, 1, 1, 1, 1).expand(B, 1, *x.shape[2:])], 1)


class D_H(nn.Module):
    """(high-res slab (B,1,D/num_slabs,H,W), r) -> logit (B,1) [, class logits (B,K)]. Stride-2 4^3 convs bring
    the slab's plane to 32x32 (3 of them at S=256), then the official tail, whose convs halve the depth while it
    is >= 2 and end on what is left."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg.dh_channels
        D, H, W = cfg.shape
        n_stem = _halvings((H, W), 32)
        chans = [1] + [cfg.ch_D(c // 8 >> (n_stem - 1 - i)) for i in range(n_stem)]
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
        convs.append(SNConv3d(cfg.ch_D(c) + (cfg.mbstd_group > 0), cfg.ch_D(c // 4), (d, h, w)))  # conv7
        self.convs = nn.ModuleList(convs)
        self.fc1 = SNLinear(cfg.ch_D(c // 4) + 1, cfg.ch_D(c // 8))
        self.fc2 = SNLinear(cfg.ch_D(c // 8), 1)
        self.fc_class = SNLinear(cfg.ch_D(c // 8), cfg.ac_classes) if cfg.ac_classes else None
        self.r_max, self.d_stretch, self.mbstd_group = cfg.r_max, cfg.d_stretch, cfg.mbstd_group

    def forward(self, x, r):
        x = stretch_dark(x, self.d_stretch)
        for i, conv in enumerate(self.convs):
            if self.mbstd_group and i == len(self.convs) - 1:
                x = mbstd(x, self.mbstd_group)
            x = F.leaky_relu(conv(x), 0.2)
        x = x.flatten(1)  # (B,128)
        # r enters normalised to [0, 1] by this size's largest start (official: crop_idx / 224 at 256)
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


class SlabClassifier(nn.Module):
    """C (class_window): high-res slabs (B,1,d,H,W) -> class logits (B,K), from intensities alone. A learnt function
    of each voxel's windowed value, averaged over the voxels below the window's top that the body encloses in their
    axial slice (the lungs, for a CT lung window), then a linear layer: it reads the class as a density index such
    as LAA-950 does, and sees no shapes that G could write a code into. Values above hi read as hi."""

    def __init__(self, cfg, width=16):
        super().__init__()
        self.window = cfg.class_window
        self.f = nn.Sequential(nn.Linear(1, width), nn.LeakyReLU(0.2), nn.Linear(width, width), nn.LeakyReLU(0.2))
        self.out = nn.Linear(width, cfg.num_classes)

    def region(self, x):
        """The voxels C reads in slabs x: a mask (B,d*H*W) and each masked voxel's sample index (no gradient)."""
        B = x.shape[0]
        with torch.no_grad():
            m = enclosed(x.detach().flatten(0, 2) < self.window[-1]).view(B, -1)
            return m, torch.arange(B, device=x.device).repeat_interleave(m.sum(1))

    def forward(self, x, region=None):
        (lo, hi), B = self.window[:2], x.shape[0]
        m, which = self.region(x) if region is None else region
        v = ((x.reshape(B, -1)[m] - lo) / (hi - lo)).clamp(0, 1)  # (n,): the window -> [0, 1]
        h = self.f(v[:, None].float())  # (n,width)
        mean = h.new_zeros(B, h.shape[1]).index_add(0, which, h) / m.sum(1, keepdim=True).clamp_min(1)
        return self.out(mean)  # a slab with no enclosed voxel: the prior (the bias)


def enclosed(dark):
    """The voxels of a (N,H,W) boolean mask with a voxel outside the mask on all four sides in their row and column:
    what a body encloses, in one pass of cumulative maxima (eval.py's lung mask is the exact flood fill)."""
    wall = (~dark).to(torch.uint8)
    seen = lambda t, dim: t.cummax(dim).values.bool()
    return dark & seen(wall, 1) & seen(wall.flip(1), 1).flip(1) & seen(wall, 2) & seen(wall.flip(2), 2).flip(2)


class Discriminator(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.D_H, self.D_L = D_H(cfg), D_L(cfg)
        self.C = SlabClassifier(cfg) if cfg.class_window else None
        self.C_twin = SlabClassifier(cfg) if cfg.class_twin else None
        self.num_slabs, self.slab_a = cfg.num_slabs, cfg.slab_a

    def forward(self, slab, r, low):
        """D^H's and D^L's logits averaged, as officially; the class logits likewise. r=None: `slab` is the whole
        volume and D^H judges each of its slabs, their logits averaged (the non-amortised model)."""
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
        self.norm1 = GroupNorm(GN_GROUPS, h)
        self.conv2 = nn.Conv3d(h, h, 3, 1, 1)
        self.norm2 = GroupNorm(GN_GROUPS, h)
        self.conv3 = nn.Conv3d(h, c, 4, 2, 1)
        self.norm3 = GroupNorm(GN_GROUPS, c)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))  # (B,32,d/2,H/2,W/2)
        x = F.relu(self.norm2(self.conv2(x)))
        return F.relu(self.norm3(self.conv3(x)))  # (B,64,d/4,H/4,W/4)


class E_G(nn.Module):
    """A-hat (B,64,S/4,S/4,S/4) -> Z-hat (B,latent_dim)."""

    def __init__(self, cfg):
        super().__init__()
        c, a = cfg.eg_channels, cfg.a_shape
        n = _halvings(a, 4)
        chans = [cfg.ch(2 * cfg.g_channels)] + [cfg.ch(c >> (n - 1 - i)) for i in range(n)]
        self.convs = nn.ModuleList(nn.Conv3d(i, o, 4, 2, 1) for i, o in zip(chans[:-1], chans[1:]))
        self.norms = nn.ModuleList(GroupNorm(GN_GROUPS, o) for o in chans[1:])
        self.head = nn.Conv3d(chans[-1], cfg.latent_dim, tuple(d >> n for d in a))

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return self.head(x).flatten(1)


# -----------------------------------------------------------------------------
# the whole model and the losses of its four alternating updates

NETS = ("D", "G", "E_H", "E_G")  # the four networks, in the order the paper's updates train them


def _bce(logit, target):  # reduced in float32 whatever the autocast dtype
    logit = logit.float()
    return F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, target))


def _rec_l1(rec_slab, rec_low, x_slab, x_low):  # eq. 7: the slab's L1 and the low-res volume's, averaged (official)
    return (F.l1_loss(rec_slab.float(), x_slab.float()) + F.l1_loss(rec_low.float(), x_low.float())) / 2


def _accuracy(logits, c):
    return (logits.detach().argmax(1) == c).float().mean()


class HAGAN(nn.Module):
    def __init__(self, cfg=None, **kwargs):
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else HAGANConfig(**kwargs)
        self.G = Generator(cfg)
        self.D = Discriminator(cfg)
        self.E_H = E_H(cfg)
        self.E_G = E_G(cfg)

    def generate(self, z, c=None, chunk=0):
        return self.G.generate(z, c, chunk)

    def train_only(self, name):
        """Gradients for network `name` alone ('D', 'G', 'E_H' or 'E_G'): each of the four updates trains one
        network with the others frozen. Returns that network."""
        for k in NETS:
            getattr(self, k).requires_grad_(k == name)
        return getattr(self, name)

    def configure_optimizers(self, lr_G=1e-4, lr_D=4e-4, lr_E=1e-4, betas=(0.0, 0.999)):
        """One Adam per update, in the updates' order (defaults: paper Sec. III-E)."""
        lrs = dict(D=lr_D, G=lr_G, E_H=lr_E, E_G=lr_E)
        fused = next(self.parameters()).device.type in ("cuda", "cpu")  # one kernel per step, no host sync
        return {k: torch.optim.Adam(getattr(self, k).parameters(), lr=lrs[k], betas=betas, eps=1e-8, fused=fused)
                for k in NETS}

    @torch.no_grad()
    def encode_A(self, x):
        """A-hat of whole volumes x (B,1,D,H,W): E^H on each non-overlapping slab T_v, concatenated on A's grid
        (Sec. III-C), one slab's activations at a time."""
        n = x.shape[2] // self.cfg.num_slabs
        return torch.cat([self.E_H(x[:, :, v:v + n]) for v in range(0, x.shape[2], n)], dim=2)

    @torch.no_grad()
    def encode(self, x):
        """Z-hat = E^G(A-hat) of whole volumes (B,1,D,H,W) -> (B,latent_dim)."""
        return self.E_G(self.encode_A(x))

    # Each loss returns (loss, stats), stats a dict of scalar tensors that train.py logs. x: whole real volumes
    # (B,1,D,H,W); x_low their low-res versions (B,1,D/4,H/4,W/4); r: the iteration's slab start (None: the whole
    # volume, the non-amortised model); c: class labels or None. `extra` (Extras, below) adds the terms beyond
    # the paper that train.py's config turns on.

    def loss_D(self, x, x_low, r, z, c=None, extra=None):
        """Eqs. 4-5 for D^H and D^L: real (S^H(x; r), x_low) against G's, non-saturating BCE on the averaged logits;
        conditional: + the AC-GAN class term on both (IV-C)."""
        with torch.no_grad():
            fake_slab, fake_low = self.G(z, r, c)
        x_slab = S_H(x, r, self.cfg.num_slabs)
        if extra is not None and extra.r1:  # R1 differentiates D at the real inputs
            x_slab, x_low = x_slab.detach().requires_grad_(True), x_low.detach().requires_grad_(True)
        real, real_cls = self.D(x_slab, r, x_low)
        fake, fake_cls = self.D(fake_slab, r, fake_low)
        loss = _bce(real, 1.0) + _bce(fake, 0.0)
        stats = dict(D_real=real.detach().float().mean(), D_fake=fake.detach().float().mean())
        if real_cls is not None:
            loss = loss + F.cross_entropy(real_cls.float(), c) + F.cross_entropy(fake_cls.float(), c)
            stats.update(cls_real=_accuracy(real_cls, c), cls_fake=_accuracy(fake_cls, c))
        if extra is not None:
            loss = extra.add_D(self, loss, stats, x, (x_slab, x_low, real), fake_slab, c)
        return loss, stats

    def loss_G(self, r, z, c=None, lambda_class=0.1, extra=None):
        """Eqs. 4-5 for G^A, G^H and G^L; conditional: + lambda_class times the AC-GAN class term on G's volumes."""
        fake_slab, fake_low = self.G(z, r, c)
        logit, cls = self.D(fake_slab, r, fake_low)
        loss, stats = _bce(logit, 1.0), {}
        if cls is not None:
            loss = loss + lambda_class * F.cross_entropy(cls.float(), c)
        if extra is not None:
            loss = extra.add_G(self, loss, stats, fake_slab, fake_low, c)
        return loss, stats

    def loss_E_H(self, x, r, c=None, lambda1=5.0):
        """Eq. 6: the real slab S^H(x; r) through E^H and back through G^H, L1 (g_class: G^H given c)."""
        x_slab = S_H(x, r, self.cfg.num_slabs)
        l1 = F.l1_loss(self.G.G_H(self.E_H(x_slab), c).float(), x_slab.float())
        return lambda1 * l1, dict(rec_E_H=l1.detach())

    def loss_E_G(self, x, x_low, r, c=None, lambda2=5.0):
        """Eq. 7: Z-hat = E^G(A-hat) through G, L1 on the slab at r and on the low-res volume. A-hat = E^H on every
        slab of x, without gradients: this update trains E^G alone."""
        rec_slab, rec_low = self.G(self.E_G(self.encode_A(x)), r, c)
        l1 = _rec_l1(rec_slab, rec_low, S_H(x, r, self.cfg.num_slabs), x_low)
        return lambda2 * l1, dict(rec_E_G=l1.detach())

    @classmethod
    def from_official(cls, G, D=None, E=None, Sub_E=None, img_size=None, **kwargs):
        """Load official checkpoint files (G_iterN.pth etc.: {'model': state_dict, ...}, keys perhaps 'module.'-
        prefixed). img_size defaults to what D/Sub_E reveal, else 256 (the official 128 and 256 generators have the
        same weights and differ only in upsampling)."""
        paths = {k: p for k, p in dict(G=G, D=D, E=E, Sub_E=Sub_E).items() if p}
        sds = {k: _official_state_dict(p, k) for k, p in paths.items()}
        g = sds["G"]
        if "fc1.weight" not in g or "tp_conv1.weight" not in g:
            raise ValueError(f"{G}: not an official HA-GAN Generator checkpoint (no fc1/tp_conv1 weights)")
        if img_size is None:
            probe = sds.get("D", sds.get("Sub_E"))
            img_size = 256 if probe is None or "conv1.weight" in probe else 128
        num_classes = sds["D"]["fc2_class.weight"].shape[0] if "fc2_class.weight" in sds.get("D", {}) else 0
        latent_dim = g["fc1.weight"].shape[1] - num_classes
        model = cls(HAGANConfig(img_size=img_size, latent_dim=latent_dim, num_classes=num_classes, **kwargs))
        for k, sd in sds.items():
            target = dict(G=model.G, D=model.D, E=model.E_H, Sub_E=model.E_G)[k]
            mapped = {_official_key(k, key, target): v for key, v in sd.items()}
            ref = target.state_dict()
            missing = sorted(set(ref) - set(mapped)) + [f"(unexpected {q.lstrip('?')})" for q in set(mapped) - set(ref)]
            bad = [f"{q} {tuple(mapped[q].shape)} vs {tuple(ref[q].shape)}"
                   for q in ref if q in mapped and mapped[q].shape != ref[q].shape]
            if missing or bad:
                raise ValueError(f"{paths[k]}: does not fit an official HA-GAN {k} at img_size {img_size}, latent "
                                 f"{latent_dim}, {num_classes} classes: " + (f"missing {missing[:3]} " if missing
                                                                             else "") + (f"shape {bad[:3]}" if bad else ""))
            target.load_state_dict(mapped)
        return model


# -----------------------------------------------------------------------------
# beyond the paper: the extra terms of train.py's small-data and class options, added last to the paper's losses
# (loss_D, loss_G) and nothing else in them changed. Each is off at 0 / without its model option.


def r1_penalty(logits, *inputs):
    """R1 (Mescheder et al. 2018): |d logits / d inputs|^2 over all inputs, per sample, batch-averaged. The graph is
    kept, so the penalty trains D."""
    grads = torch.autograd.grad(logits.float().sum(), inputs, create_graph=True)
    return sum(g.float().square().flatten(1).sum(1) for g in grads).mean()


def pairwise_l1(v):
    """(b, ...) -> the mean L1 distance over the b(b-1)/2 distinct pairs: how spread a batch is."""
    v = v.flatten(1)
    b = len(v)
    return sum((v[i + 1:] - v[i]).abs().mean(1).sum() for i in range(b - 1)) / (b * (b - 1) / 2)


@dataclass
class Extras:
    r1: float = 0.0  # this D update's R1 weight (train.py's lazy schedule: r1_gamma / 2 * r1_interval, or 0)
    lambda_div: float = 0.0  # the diversity hinge: while G's low-res batch is less spread than real ones, spread it
    div_real: float = 1.0  # the hinge's target: the real low-res volumes' mean pairwise L1
    lambda_class: float = 0.1  # class_window: the weight of C's (and its twin's) term in G's loss

    def add_D(self, model, loss, stats, x, real, fake_slab, c):
        """D's update: class_window's C learns the class from every slab of the real volumes x, its twin (class_twin)
        from G's slab; R1 on the real inputs. real = (x_slab, x_low, D's logits on them)."""
        C, twin = model.D.C, model.D.C_twin
        if c is not None and C is not None:
            region = C.region(fake_slab)
            if twin is not None:
                twin_cls = twin(fake_slab, region)
                loss = loss + F.cross_entropy(twin_cls.float(), c)
                stats["cls_twin"] = _accuracy(twin_cls, c)  # near chance: G's classes look alike to the twin
            real_cls = C(torch.cat(x.detach().chunk(model.cfg.num_slabs, dim=2)))  # (num_slabs*B, K)
            with torch.no_grad():
                fake_cls = C(fake_slab, region)
            loss = loss + F.cross_entropy(real_cls.float(), c.repeat(model.cfg.num_slabs))
            stats.update(cls_real=_accuracy(real_cls, c.repeat(model.cfg.num_slabs)), cls_fake=_accuracy(fake_cls, c))
        if self.r1:
            penalty = r1_penalty(real[2], real[0], real[1])
            loss = loss + self.r1 * penalty
            stats["R1"] = penalty.detach()
        return loss

    def add_G(self, model, loss, stats, fake_slab, fake_low, c):
        """G's update: C's class term on G's slab, minus its twin's (TAC-GAN: cancels C's reward for classes easier
        to tell apart than the real ones); the diversity hinge on G's low-res batch."""
        C, twin = model.D.C, model.D.C_twin
        if c is not None and C is not None:
            region = C.region(fake_slab)
            loss = loss + self.lambda_class * F.cross_entropy(C(fake_slab, region).float(), c)
            if twin is not None:
                loss = loss - self.lambda_class * F.cross_entropy(twin(fake_slab, region).float(), c)
        if self.lambda_div > 0 and len(fake_low) > 1:
            spread = pairwise_l1(fake_low.float()) / self.div_real  # 1 = as spread as the real volumes
            loss = loss + self.lambda_div * F.relu(1 - spread)
            stats["div"] = spread.detach()
        return loss


# -----------------------------------------------------------------------------
# checkpoints: the official files, and ours (train.py writes them; sample.py, encode.py and eval.py read them)


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
    """An official parameter name -> ours within the matching module ('?key' if it is not an official name)."""
    key = key.replace("fc2_class.", "fc_class.")  # D^H's class head
    m = re.fullmatch(r"(sub_[GD]\.)?([a-z_]+?)(\d+)?\.(weight|bias|u0|sv0)", key)
    if not m:
        return f"?{key}"
    sub, name, i, p = m.group(1) or "", m.group(2), int(m.group(3) or 0), m.group(4)
    p = {"u0": "u", "sv0": "sigma"}.get(p, p)
    conv = name in ("tp_conv", "conv")
    if net == "G":
        if sub:
            return f"G_L.{'conv' if conv else 'norm'}{i}.{p}"
        if name == "fc":
            return f"G_A.fc.{p}"
        return f"G_A.{'convs' if conv else 'norms'}.{i - 1}.{p}" if i <= 5 else f"G_H.{'conv' if conv else 'norm'}{i - 5}.{p}"
    if net == "D":
        if sub:  # official conv{5 - n}..conv4, then conv5 = the head
            return f"D_L.head.{p}" if i == 5 else f"D_L.convs.{i - (5 - len(target.D_L.convs))}.{p}"
        if name in ("fc", "fc_class"):
            return f"D_H.{name}{i or ''}.{p}"
        return f"D_H.convs.{i - (8 - len(target.D_H.convs))}.{p}"  # official conv{8 - n}..conv7
    if net == "E":
        return f"{'conv' if conv else 'norm'}{i}.{p}"
    if conv and i == 5:  # Sub_E: official conv{5 - n}..conv4 with bn of the same number, then conv5 = the head
        return f"head.{p}"
    return f"{'convs' if conv else 'norms'}.{i - (5 - len(target.convs))}.{p}"


def model_config(args, path):
    """HAGANConfig from a checkpoint's model_args; a one-line ValueError for keys this code does not know or
    values it cannot build."""
    args = dict(args)
    if "out_scale" in args:  # checkpoints from before g_out: (out_scale, out_clip), and retired options when off
        head = (args.pop("out_scale"), args.pop("out_clip", False))
        args["g_out"] = {(1.0, False): "tanh", (OUT_SCALE, False): "scaled", (OUT_SCALE, True): "clipped"}.get(
            head, f"out_scale={head[0]}, out_clip={head[1]}")
        args = {k: v for k, v in args.items() if not (k in ("out_leak", "gh_width") and v == 0)}
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
    """(model in eval mode, ckpt) from a train.py checkpoint, G's weights replaced by their moving average when it
    has one and ema=True. A one-line ValueError for a missing or foreign file."""
    ckpt = read_checkpoint(path, mmap=True)  # mmap: tensors are read as load_state_dict copies them
    model = HAGAN(model_config(ckpt["model_args"], path))
    try:
        model.load_state_dict(ckpt["model"])
        if ema and ckpt.get("ema_G"):
            model.G.load_state_dict(ckpt["ema_G"])
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ValueError(f"{path}: weights do not fit the checkpoint's model_args "
                         f"({lines[1].strip() if len(lines) > 1 else e})") from None
    return model.to(device).eval(), ckpt
