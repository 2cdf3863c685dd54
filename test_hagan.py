"""
The test suite, CPU only, a few minutes on 2 cores:
$ python3 -m pytest -q test_hagan.py
Sections follow the files: model.py, prepare.py, train.py, sample.py/encode.py, eval.py.
"""

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import HAGAN, HAGANConfig, S_H, S_L, slab_range, override, load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny(S=32, **kw):
    torch.manual_seed(0)
    return HAGAN(HAGANConfig(img_size=S, width=1 / 8, latent_dim=16, **kw))


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
        slab, low = m.G(z, m.cfg.r_max, c)
        assert slab.shape == (B, 1, D // 8, H, W) and low.shape == (B, 1, D // 4, H // 4, W // 4)
        assert m.G.G_H(S_L(A, 0)).shape == slab.shape
        logit, cls = m.D(slab, 3, low)
        assert logit.shape == (B, 1) and (cls is None if not nc else cls.shape == (B, nc))
        assert m.E_H(slab).shape == (B, 64, D // 32, H // 4, W // 4)
        assert m.E_G(A).shape == (B, 1024)


def test_tiny_model_runs_on_cpu_with_batch_one():
    m = tiny(32, num_classes=3)
    slab, low = m.G(torch.randn(1, 16), 0, torch.tensor([2]))
    assert slab.shape == (1, 1, 4, 32, 32) and low.shape == (1, 1, 8, 8, 8)
    assert slab.abs().max() <= 1 and torch.isfinite(slab).all()
    x = m.generate(torch.randn(1, 16), torch.tensor([1]))
    assert x.shape == (1, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="class-conditional"):
        m.G(torch.randn(1, 16), 0)


def test_parameter_counts_match_official():
    # counted from the official modules (Generator, Discriminator, Encoder, Sub_Encoder)
    want = {128: (52_518_210, 7_241_442, 161_152, 19_663_168), 256: (52_518_210, 7_402_258, 161_152, 19_663_264)}
    for S, counts in want.items():
        with torch.device("meta"):
            m = HAGAN(HAGANConfig(img_size=S))
        got = tuple(sum(p.numel() for p in net.parameters()) for net in (m.G, m.D, m.E_H, m.E_G))
        assert got == counts


def test_total_parameters_follow_the_papers_table_vii():
    # Table VII: 74.7M, 78.7M, 79.6M, 79.7M at 32^3 .. 256^3; our size rule reproduces all four
    for S, total in ((32, 74.7), (64, 78.7), (128, 79.6), (256, 79.7)):
        with torch.device("meta"):
            m = HAGAN(HAGANConfig(img_size=S))
        assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == total


def test_bad_sizes_are_refused_with_the_sizes_that_work():
    for bad in (48, 100, 1024, (64, 64)):
        with pytest.raises(ValueError, match="32, 64, 128, 256, 512"):
            HAGANConfig(img_size=bad)


@pytest.mark.parametrize("S", [32, 64, (32, 64, 96)])
def test_slabwise_generation_equals_whole_volume(S):
    m = tiny(S, num_classes=2).eval()
    z, c = torch.randn(2, 16), torch.tensor([0, 1])
    whole = m.generate(z, c)
    n = m.cfg.a_shape[0]
    for k in (1, 2, 3, n - 1, n):  # 3 does not divide the depth of A at these sizes
        assert (m.generate(z, c, slab=k) - whole).abs().max() < 1e-5


def test_selectors_align_real_and_generated_slabs_for_every_r():
    # A whose slice d holds the value d: G^H's nearest 4x upsampling of S^L(A; r) must land on
    # exactly the voxels S^H picks from the upsampled whole volume.
    for depth in (32, 64, 256):
        a = torch.arange(depth // 4, dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, 1, -1, 2, 2)
        X = F.interpolate(a, scale_factor=4, mode="nearest")
        rmax = depth // 4 - depth // 32
        for r in range(rmax + 1):
            assert torch.equal(S_H(X, r), F.interpolate(S_L(a, r), scale_factor=4, mode="nearest"))
            assert S_H(X, r).shape[2] == depth // 8
        with pytest.raises(ValueError, match="outside"):
            slab_range(rmax + 1, depth)


def test_training_slab_is_lifted_from_the_right_slice_of_A():
    # with GroupNorm over a slab instead of the volume the values differ, but G^H(S^L(A; r)) must
    # equal G^H applied to A's slab r, which is what D^H is shown next to S^H(X; r)
    m = tiny(64)
    z = torch.randn(2, 16)
    r = 5
    slab, _ = m.G(z, r)
    A = m.G.G_A(z)
    assert torch.allclose(slab, m.G.G_H(A[:, :, r:r + 2]), atol=1e-6)


def test_encode_matches_direct_hierarchical_computation():
    m = tiny(64).eval()
    x = torch.rand(2, 1, 64, 64, 64) * 2 - 1
    Z = m.encode(x)
    direct = m.E_G(torch.cat([m.E_H(x[:, :, v * 8:(v + 1) * 8]) for v in range(8)], dim=2))
    assert Z.shape == (2, 16) and torch.allclose(Z, direct, atol=1e-6)


def test_generator_unchanged_by_an_encoder_update():
    m = tiny(32)
    x = torch.rand(2, 1, 4, 32, 32) * 2 - 1
    g0 = [p.detach().clone() for p in m.G.parameters()]
    e0 = [p.detach().clone() for p in m.E_H.parameters()]
    m.G.requires_grad_(False)
    opt = torch.optim.Adam(m.E_H.parameters(), lr=1e-3)
    loss, stats = m.loss_E_H(x)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in m.G.parameters())
    assert all(torch.equal(a, b) for a, b in zip(g0, m.G.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(e0, m.E_H.parameters()))
    assert math.isclose(loss.item(), 5 * stats["rec_E_H"].item(), rel_tol=1e-6)


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


# the official checkpoints: key names and shapes as the official modules define them


def _official_shapes(S, latent=1024, nc=0):
    """{net: {key: shape}} of the official Generator, Discriminator, Encoder, Sub_Encoder."""
    def conv(name, i, o, k, bias=True, sn=False):
        k = (k,) * 3 if isinstance(k, int) else k
        d = {f"{name}.weight": (o, i) + k, f"{name}.bias": (o,)}
        if sn:
            d.update({f"{name}.u0": (1, o), f"{name}.sv0": (1,)})
        return d

    def gn(name, c):
        return {f"{name}.weight": (c,), f"{name}.bias": (c,)}

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
    for i in range(1, 6):
        if 2 <= i <= (5 if S == 256 else 4):
            h = F.interpolate(h, scale_factor=2)
        h = F.conv3d(h, sd[f"tp_conv{i}.weight"], sd[f"tp_conv{i}.bias"], padding=1)
        h = F.relu(F.group_norm(h, 8, sd[f"bn{i}.weight"], sd[f"bn{i}.bias"]))
    h = F.conv3d(F.interpolate(h, scale_factor=2), sd["tp_conv6.weight"], sd["tp_conv6.bias"], padding=1)
    h = F.relu(F.group_norm(h, 8, sd["bn6.weight"], sd["bn6.bias"]))
    h = F.conv3d(F.interpolate(h, scale_factor=2), sd["tp_conv7.weight"], sd["tp_conv7.bias"], padding=1)
    return torch.tanh(h)


def test_official_checkpoints_load_and_generate_the_same_volume(tmp_path):
    paths, sds = _official_files(tmp_path, 128)
    m = HAGAN.from_official(G=paths["G"], D=paths["D"], E=paths["E"], Sub_E=paths["Sub_E"])
    assert m.cfg.shape == (128, 128, 128) and m.cfg.latent_dim == 1024
    z = torch.randn(1, 1024)
    ours = m.eval().generate(z)
    assert ours.shape == (1, 1, 128, 128, 128)
    assert (ours - _official_generate(sds["G"], z, 128)).abs().max() < 1e-4
    # every other network's weights landed where the official ones were
    assert torch.equal(m.D.D_H.convs[0].weight, sds["D"]["conv2.weight"])
    assert torch.equal(m.D.D_H.convs[0].u, sds["D"]["conv2.u0"])
    assert torch.equal(m.D.D_L.head.weight, sds["D"]["sub_D.conv5.weight"])
    assert torch.equal(m.E_G.convs[0].weight, sds["Sub_E"]["conv2.weight"])
    assert torch.equal(m.E_H.norm3.bias, sds["E"]["bn3.bias"])


def test_official_256_conditional_layout_and_bad_files(tmp_path):
    paths, sds = _official_files(tmp_path, 256, nc=5, prefix="")
    m = HAGAN.from_official(G=paths["G"], D=paths["D"], E=paths["E"], Sub_E=paths["Sub_E"])
    assert m.cfg.shape == (256,) * 3 and m.cfg.num_classes == 5 and m.cfg.latent_dim == 1024
    assert torch.equal(m.D.D_H.convs[0].weight, sds["D"]["conv1.weight"])
    assert torch.equal(m.D.D_H.fc_class.weight, sds["D"]["fc2_class.weight"])
    assert torch.equal(m.G.G_H.conv2.weight, sds["G"]["tp_conv7.weight"])
    assert torch.equal(m.G.G_L.norm2.weight, sds["G"]["sub_G.bn2.weight"])
    with pytest.raises(ValueError, match="not an official HA-GAN Generator"):
        HAGAN.from_official(G=paths["D"])
    with pytest.raises(ValueError, match=r"D_iter80000\.pth: does not fit an official HA-GAN D at img_size 128"):
        HAGAN.from_official(G=paths["G"], D=paths["D"], img_size=128)  # 256 files forced to 128
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: cannot read"):
        HAGAN.from_official(G=str(junk))


def test_override_config_files_and_arguments(tmp_path):
    base = dict(out_dir="out", max_iters=10, lr=1e-4, compile=False, img_size=256)
    f = tmp_path / "c.py"
    f.write_text("max_iters = 20\nlr = 2e-4\n")
    cfg = override(dict(base), [str(f), "--max_iters", "30", "--lr=1", "--compile", "--out_dir=123", "--img_size=[64,96,128]"])
    assert cfg == dict(out_dir="123", max_iters=30, lr=1.0, compile=True, img_size=[64, 96, 128])
    with pytest.raises(SystemExit, match="unknown config key 'max_iter'"):
        override(dict(base), ["--max_iter=5"])
    with pytest.raises(SystemExit, match="max_iters must be int"):
        override(dict(base), ["--max_iters=1.5"])
    f.write_text("max_itres = 20\n")
    with pytest.raises(SystemExit, match=r"unknown config key 'max_itres' in .*c\.py"):
        override(dict(base), [str(f)])


def test_every_config_file_loads():
    # the keys of every config/*.py exist in train.py's defaults, with the right types
    src = open(os.path.join(HERE, "train.py")).read()
    start = src.index("config = dict(")
    defaults = eval(src[start + len("config = "):src.index("\noverride(config)")])
    files = sorted(f for f in os.listdir(os.path.join(HERE, "config")) if f.endswith(".py"))
    assert {"train_demo.py", "train_lung_ct.py", "train_brain_mri.py", "train_conditional.py"} <= set(files)
    for name in files:
        cfg = override(dict(defaults), [os.path.join(HERE, "config", name)])
        HAGANConfig(img_size=cfg["img_size"], width=cfg["width"], latent_dim=cfg["latent_dim"],
                    num_classes=cfg["num_classes"])


# -----------------------------------------------------------------------------
# train.py

TINY = ["--img_size=32", "--width=0.125", "--latent_dim=16", "--batch_size=2", "--log_interval=1",
        "--sample_interval=0", "--dtype=float32"]


@pytest.fixture(scope="session")
def demo32(tmp_path_factory):
    import prepare
    out = str(tmp_path_factory.mktemp("data") / "demo32")
    assert prepare.make_demo(out, num=12, img_size=32, log=lambda *a: None) == 0
    return out


def _train(args, cwd=HERE, **kw):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py")] + args, cwd=cwd,
                          capture_output=True, text=True, timeout=600, **kw)


def _log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("nc", [0, 5])
def test_each_update_changes_only_its_own_network(nc):
    m = tiny(32, num_classes=nc)
    nets = dict(D=m.D, G=m.G, E_H=m.E_H, E_G=m.E_G)
    x = torch.rand(2, 1, 32, 32, 32) * 2 - 1
    low, r, c = F.avg_pool3d(x, 4), 3, (torch.tensor([1, 4]) if nc else None)
    z = torch.randn(2, 16)
    phases = dict(D=lambda: m.loss_D(S_H(x, r), low, r, z, c), G=lambda: m.loss_G(r, z, c),
                  E_H=lambda: m.loss_E_H(S_H(x, r)), E_G=lambda: m.loss_E_G(m.encode_A(x), S_H(x, r), low, r, c))
    for name, loss_fn in phases.items():  # train.py's update(): freeze all but one, step that one
        for k, net in nets.items():
            net.requires_grad_(k == name)
        before = {k: [p.detach().clone() for p in net.parameters()] for k, net in nets.items()}
        loss, _ = loss_fn()
        assert torch.isfinite(loss)
        loss.backward()
        torch.optim.Adam(nets[name].parameters(), lr=1e-3, betas=(0.0, 0.999)).step()
        for k, net in nets.items():
            changed = [not torch.equal(a, p) for a, p in zip(before[k], net.parameters())]
            if k == name:
                assert sum(changed) >= len(changed) // 2, f"{name} update left {k} unchanged"
            else:
                assert not any(changed) and all(p.grad is None for p in net.parameters()), f"{name} touched {k}"
            net.zero_grad(set_to_none=True)


def test_train_runs_logs_and_checkpoints(demo32, tmp_path):
    out = str(tmp_path / "out")
    p = _train(TINY + [f"--data_dir={demo32}", f"--out_dir={out}", "--max_iters=3", "--ema_decay=0.9",
                       "--sample_interval=3"])
    assert p.returncode == 0, p.stderr
    log = _log(out)
    assert [r["iter"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in log for k in ("D", "G", "E_H", "E_G"))
    assert "ms/iter" in p.stdout and "vol/s" in p.stdout and "peak" in p.stdout and "ETA" in p.stdout
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["iter_num"] == 3 and ck["meta"]["img_size"] == [32, 32, 32] and ck["config"]["max_iters"] == 3
    assert set(ck["optimizers"]) == {"D", "G", "E_H", "E_G"} and ck["ema_G"] and ck["fingerprint"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["resolved"]["model_args"]["width"] == 0.125
    png = open(os.path.join(out, "samples_000003.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    model, _ = load_checkpoint(os.path.join(out, "ckpt.pt"))  # EMA weights for sampling
    assert all(torch.equal(model.G.state_dict()[k], v) for k, v in ck["ema_G"].items())


def test_conditional_training_uses_the_class_labels(demo32, tmp_path):
    out = str(tmp_path / "cond")
    p = _train(TINY + [f"--data_dir={demo32}", f"--out_dir={out}", "--max_iters=2", "--num_classes=5",
                       "--sample_interval=2"])
    assert p.returncode == 0, p.stderr
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["model"]["D.D_H.fc_class.weight"].shape[0] == 5 and ck["model_args"]["num_classes"] == 5
    assert ck["model"]["G.G_A.fc.weight"].shape[1] == 16 + 5  # z and the one-hot class


def test_resume_is_exact(demo32, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = [f"--data_dir={demo32}", "--ema_decay=0.9", "--ckpt_interval=100"] + TINY
    assert _train(args + [f"--out_dir={a}", "--max_iters=4"]).returncode == 0
    assert _train(args + [f"--out_dir={b}", "--max_iters=2"]).returncode == 0
    p = _train(args + [f"--out_dir={b}", "--max_iters=4", "--init_from=resume"])
    assert p.returncode == 0 and "resumed" in p.stdout, p.stderr
    assert _log(a) == [dict(r, ms_per_iter=x["ms_per_iter"], peak_gib=x["peak_gib"]) for r, x in zip(_log(b), _log(a))]
    ca = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
    cb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)
    for key in ("model", "ema_G"):
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key])
    assert ca["optimizers"]["G"]["state"][0]["exp_avg_sq"].equal(cb["optimizers"]["G"]["state"][0]["exp_avg_sq"])


def test_ddp_two_ranks_hold_identical_weights(demo32, tmp_path):
    out = str(tmp_path / "ddp")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "train.py"), f"--data_dir={demo32}", f"--out_dir={out}",
                        "--max_iters=3", "--device=cpu", "--backend=gloo"] + TINY,
                       capture_output=True, text=True, timeout=600, cwd=HERE)
    assert p.returncode == 0, "\n".join(l for l in p.stderr.splitlines() if not l.startswith("  "))[-6000:]
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    sums = ck["rank_checksums"]
    own = sum(v.double().sum().item() for k, v in ck["model"].items() if not k.endswith((".u", ".sigma")))
    assert len(sums) == 2 and sums[0] == sums[1] and math.isclose(sums[0], own, rel_tol=1e-12)
    assert p.stdout.count("iter 3:") == 1  # rank 0 alone logs


def test_bad_config_and_bad_data_fail_with_one_line(demo32, tmp_path):
    p = _train(["--max_iter=5"])
    assert p.returncode != 0 and "unknown config key 'max_iter'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = _train([f"--data_dir={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'o'}"] + TINY)
    assert p.returncode != 0 and "no prepared dataset" in p.stderr and "prepare.py" in p.stderr
    p = _train([f"--data_dir={demo32}", f"--out_dir={tmp_path / 'o'}", "--img_size=64"])
    assert p.returncode != 0 and "32x32x32" in p.stderr and "--img_size=32" in p.stderr
    p = _train(TINY + [f"--data_dir={demo32}", f"--out_dir={tmp_path / 'o'}", "--num_classes=3"])
    assert p.returncode != 0 and "5 classes but num_classes=3" in p.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = _train([f"--data_dir={demo32}", f"--out_dir={blocker / 'out'}"] + TINY)
    assert p.returncode != 0 and "cannot write there" in p.stderr


def test_interrupted_checkpoints_stay_loadable(demo32, tmp_path):
    import signal
    import time
    out = tmp_path / "o"
    args = [f"--data_dir={demo32}", f"--out_dir={out}", "--ckpt_interval=1"] + TINY
    assert _train(args + ["--max_iters=2"]).returncode == 0
    # a save killed mid-write leaves only a partial temp file: resume ignores it
    (out / "ckpt.pt.tmp").write_bytes((out / "ckpt.pt").read_bytes()[:1000])
    assert _train(args + ["--max_iters=3", "--init_from=resume"]).returncode == 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 3
    assert torch.load(out / "ckpt.prev.pt", weights_only=True)["iter_num"] == 2
    # SIGTERM (a pre-emption) finishes the iteration, saves and exits cleanly
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py")] + args + ["--max_iters=100000",
                            "--init_from=resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    while True:
        line = proc.stdout.readline()
        if line.startswith("iter 5:") or not line:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by SIGTERM" in stdout
    it = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    assert it >= 5 and f"saved {out / 'ckpt.pt'} at iteration {it}" in stdout


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(demo32, tmp_path):
    import shutil
    data = tmp_path / "nan"
    shutil.copytree(demo32, data)
    out = tmp_path / "o"
    args = [f"--data_dir={data}", f"--out_dir={out}"] + TINY
    assert _train(args + ["--max_iters=2"]).returncode == 0
    hires = np.load(data / "hires.npy", mmap_mode="r+")
    hires[:] = np.nan  # a corrupted store: every loss that reads real data turns NaN
    hires.flush()
    del hires
    p = _train(args + ["--max_iters=4", "--init_from=resume"])
    assert p.returncode == 1 and "non-finite loss at iteration 3" in p.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 2
