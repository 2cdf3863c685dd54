# Tests for eval.py (issue 6). Run: python -m pytest -q _wip_test_eval.py
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval as ev
from model import HAGAN, HAGANConfig

_EV_ROOT = os.path.dirname(os.path.abspath(__file__))


def _ev_feats(n=300, d=12, seed=0):
    g = np.random.default_rng(seed)
    A = g.standard_normal((d, d)) / np.sqrt(d)
    return g.standard_normal((n, d)) @ A + g.standard_normal(d)  # correlated, non-centred


def test_ev_fid_mmd_zero_on_identical_and_grow_with_noise():
    x = _ev_feats()
    assert abs(ev.frechet_distance(x, x)) < 1e-9
    # the unbiased MMD of a sample with itself is -2(1 - mean off-diagonal k)/n: O(1/n), not exactly 0
    assert abs(ev.mmd(x, x)) < 2.0 / len(x)
    g = np.random.default_rng(1)
    noise = g.standard_normal(x.shape)
    fids = [ev.frechet_distance(x, x + s * noise) for s in (0.1, 0.3, 1.0, 3.0)]
    mmds = [ev.mmd(x, x + s * noise) for s in (0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(mmds, mmds[1:])), mmds
    assert fids[0] < 0.1 < fids[-1] and mmds[-1] > 0.1
    # two independent samples of one distribution: both near 0 compared with a shifted one
    y = _ev_feats(seed=0)[:150], _ev_feats(seed=0)[150:]
    assert ev.mmd(*y) < 0.2 * ev.mmd(y[0], y[1] + 1.0)
    assert ev.frechet_distance(*y) < 0.2 * ev.frechet_distance(y[0], y[1] + 1.0)


def test_ev_sqrtm_and_fid_agree_with_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    g = np.random.default_rng(2)
    B = g.standard_normal((20, 20))
    A = B @ B.T + 0.1 * np.eye(20)  # symmetric positive definite
    R = ev.sqrtm_psd(A).numpy()
    np.testing.assert_allclose(R, np.real(linalg.sqrtm(A)), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(R @ R, A, rtol=1e-9, atol=1e-9)
    # FID against the official formula (scipy.linalg.sqrtm of the non-symmetric product Ca Cb)
    a, b = _ev_feats(200, 10, 3), _ev_feats(180, 10, 4) * 1.3
    Ca, Cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(Ca + Cb - 2 * np.real(linalg.sqrtm(Ca @ Cb)))
    assert ev.frechet_distance(a, b) == pytest.approx(ref, rel=1e-7)
    # rank-deficient covariances (fewer samples than features, as with 2048-d features): still finite, >= 0
    a, b = _ev_feats(8, 30, 5), _ev_feats(8, 30, 6)
    assert np.isfinite(ev.frechet_distance(a, b)) and ev.frechet_distance(a, b) > 0


def test_ev_precision_recall_and_ms_ssim():
    x = _ev_feats(100, 8)
    assert ev.precision_recall(x, x, k=3) == (1.0, 1.0)
    assert ev.precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    # fakes collapsed onto one real point: all inside the real manifold (precision 1), recall tiny
    p, r = ev.precision_recall(x, np.repeat(x[:1], 50, 0) + 1e-6, k=3)
    assert p == 1.0 and r < 0.1
    g = torch.Generator().manual_seed(0)
    v = torch.rand(2, 1, 32, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(ev.ms_ssim3d(v, v), torch.ones(2, dtype=torch.float64), atol=1e-5)
    s = [float(ev.ms_ssim3d(v[:1], (v[:1] + a * torch.randn(1, 1, 32, 32, 32, generator=g)).clamp(-1, 1)))
         for a in (0.05, 0.3, 1.0)]
    assert 1 > s[0] > s[1] > s[2] >= 0, s


def _ev_med3d_state_dict(depth):
    """A state_dict named and shaped by Med3D's (MedicalNet models/resnet.py) rules, written out here
    independently of eval.ResNet3D: conv1/bn1, layerL.i.convK/bnK, downsample.0/.1 for shortcut B
    (resnet50+), none for shortcut A (resnet10-34), plus the segmentation head conv_seg.* we drop."""
    bottleneck, counts = {10: (False, (1, 1, 1, 1)), 50: (True, (3, 4, 6, 3))}[depth]
    g = torch.Generator().manual_seed(depth)
    sd = {}

    def conv(name, o, i, k):
        sd[f"{name}.weight"] = torch.randn(o, i, k, k, k, generator=g) * 0.05

    def bn(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 1 + torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(100)

    conv("conv1", 64, 1, 7)
    bn("bn1", 64)
    cin = 64
    for L, (planes, n) in enumerate(zip((64, 128, 256, 512), counts), 1):
        cout = planes * (4 if bottleneck else 1)
        for i in range(n):
            p = f"layer{L}.{i}"
            if bottleneck:
                conv(f"{p}.conv1", planes, cin, 1), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", cout, planes, 1), bn(f"{p}.bn3", cout)
                if i == 0:
                    conv(f"{p}.downsample.0", cout, cin, 1), bn(f"{p}.downsample.1", cout)
            else:
                conv(f"{p}.conv1", planes, cin, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            cin = cout
    sd["conv_seg.1.weight"] = torch.randn(cin, 32, 2, 2, 2, generator=g)
    sd["conv_seg.1.bias"] = torch.zeros(32)
    return {"module." + k: v for k, v in sd.items()}


@pytest.mark.parametrize("depth", [10, 50])
def test_ev_med3d_weights_load(tmp_path, depth):
    sd = _ev_med3d_state_dict(depth)
    path = tmp_path / f"resnet_{depth}.pth"
    torch.save({"state_dict": sd, "epoch": 20}, path)
    net, info = ev.feature_net(str(path))
    assert info["pretrained"] and info["depth"] == depth and info["shortcut"] == ("A" if depth < 50 else "B")
    loaded = net.state_dict()
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if not k.startswith("conv_seg."):
            assert torch.equal(loaded[k], v), k
    f = ev.extract(net, torch.rand(2, 1, 32, 32, 32) * 2 - 1, "none", "cpu")
    assert f.shape == (2, 512 if depth < 50 else 2048) and torch.isfinite(f).all()
    # a file that is not Med3D: one clear error
    bad = {k: v for k, v in sd.items() if "layer4" not in k}
    torch.save({"state_dict": bad}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="Med3D"):
        ev.load_med3d(str(tmp_path / "bad.pth"))


def test_ev_random_features_fixed_seed_and_labelled():
    a, ia = ev.feature_net("", depth=10, seed=0)
    b, _ = ev.feature_net("", depth=10, seed=0)
    x = torch.rand(1, 1, 32, 32, 32) * 2 - 1
    assert torch.equal(ev.extract(a, x, "none", "cpu"), ev.extract(b, x, "none", "cpu"))
    assert not ia["pretrained"] and "RANDOM" in ia["label"]


def test_ev_quality_end_to_end(tmp_path):
    import prepare
    data = tmp_path / "demo"
    assert prepare.make_demo(str(data), num=10, img_size=32, log=lambda *a, **k: None) == 0
    m = HAGAN(HAGANConfig(img_size=32, width=1 / 8, latent_dim=16))
    ckpt = tmp_path / "ckpt.pt"
    torch.save(dict(model=m.state_dict(), model_args=dataclasses.asdict(m.cfg), ema_G={}, iter_num=0,
                    config={"fold": 1}, meta={}), ckpt)
    c = dict(ev.config, ckpt=str(ckpt), data=str(data), num=6, depth=10, ssim_pairs=2, device="cpu",
             out=str(tmp_path / "eval.json"))
    rep = ev.quality(c)
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk["features"]["pretrained"] is False and "RANDOM" in on_disk["features"]["label"]
    assert on_disk["input_norm"]["name"] == "none"
    r = rep["folds"][0]
    assert r["fold"] == 1  # the checkpoint's own held-out fold
    assert r["n_generated"] == 6 and r["n_real"] == len(prepare.VolumeDataset(str(data), "val", 1))
    for k in ("fid", "mmd", "precision", "recall", "ms_ssim"):
        assert np.isfinite(r[k]) and np.isfinite(r[k + "_floor"]), k
    # an untrained generator is far from the data; two halves of the real data are not
    assert r["fid"] > r["fid_floor"] and r["mmd"] > r["mmd_floor"]
    assert r["ms_ssim"] > 0 and 0 <= r["precision_floor"] <= 1


def test_ev_bench_s32_complete_table(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, os.path.join(_EV_ROOT, "eval.py"), "--bench", "--sizes=32",
                        "--bench_seconds=0", "--warmup=1", "--bench_width=0.125", f"--out={out}"],
                       capture_output=True, text=True, timeout=300, cwd=_EV_ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(out.read_text())
    (row,) = rep["rows"]
    for mode in ("hagan", "full"):
        cell = row[mode]
        assert "error" not in cell and not cell.get("oom"), cell
        assert cell["params"] > 0 and cell["peak_mem_mib"] > 0 and cell["it_per_s"] > 0
    assert row["hagan"]["sample_s"] > 0 and row["store_batches_per_s"] > 0
    line = next(l for l in rep["table"].splitlines() if l.startswith("| 32^3"))
    cells = [x.strip() for x in line.strip("|").split("|")]
    assert len(cells) == 9 and all(cells) and "-" not in cells[:8], cells
    assert "| 32^3 |" in p.stdout


def test_ev_bench_oom_is_a_cell_not_a_crash():
    # a 1 GiB address-space cap cannot hold torch plus a full-size model: the cell must say so
    r = ev._run_cell(32, "hagan", dict(ev.config, bench_seconds=0.0, warmup=1, mem_limit_gb=1.0, device="cpu"))
    assert r.get("oom") and ev._mem(r) == "out of memory"
