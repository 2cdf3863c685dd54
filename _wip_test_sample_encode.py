"""
sample.py and encode.py, end to end on a tiny checkpoint and the 32^3 demo data (to be merged into test_hagan.py).

    python -m pytest -q _wip_test_sample_encode.py
"""
import csv
import json
import os
import subprocess
import sys
import zlib
from dataclasses import asdict

import nibabel as nib
import numpy as np
import pytest
import torch

from model import HAGAN, HAGANConfig, load_checkpoint
from prepare import VolumeDataset, to_unit
import sample
import encode

_SE_REPO = os.path.dirname(os.path.abspath(__file__))


def _se_run(script, *args):
    """Run a script in a fresh process -> (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(_SE_REPO, script), *map(str, args)],
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def _se_ckpt(path, meta, num_classes=0):
    torch.manual_seed(0)
    m = HAGAN(HAGANConfig(img_size=32, width=1 / 8, latent_dim=16, num_classes=num_classes))
    torch.save(dict(model=m.state_dict(), model_args=asdict(m.cfg), ema_G={}, iter_num=7, config={}, meta=meta), path)
    return str(path)


def _se_one_line_error(rc, err):
    assert rc != 0
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith('HA-GAN ')]
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    return lines[0]


@pytest.fixture(scope='module')
def se_demo(tmp_path_factory):
    """The 32^3 demo dataset (12 phantoms) and tiny unconditional / conditional checkpoints carrying its meta."""
    d = tmp_path_factory.mktemp('se_demo')
    rc, out, err = _se_run('prepare.py', '--demo', f'--out={d / "demo"}', '--img_size=32', '--num=12')
    assert rc == 0, err
    meta = json.load(open(d / 'demo' / 'meta.json'))
    return dict(data=str(d / 'demo'), meta=meta, ckpt=_se_ckpt(d / 'ckpt.pt', meta),
                ckpt_c=_se_ckpt(d / 'ckpt_c.pt', meta, num_classes=meta['num_classes']))


def _se_read(path):
    img = nib.load(str(path))
    return img, np.asarray(img.dataobj)


def test_sample_writes_viewer_ready_nifti_independent_of_batch(se_demo, tmp_path):
    meta = se_demo['meta']
    a, b = tmp_path / 'a', tmp_path / 'b'
    rc, out, err = _se_run('sample.py', '--ckpt', se_demo['ckpt'], '--out', a, '--num=3', '--batch=1', '--png')
    assert rc == 0, err
    rc, out, err = _se_run('sample.py', f'--ckpt={se_demo["ckpt"]}', f'--out={b}', '--num=3', '--batch=3', '--slab=2')
    assert rc == 0, err
    names = [f'seed{s:06d}' for s in (1337, 1338, 1339)]
    assert sorted(os.listdir(a)) == sorted(n + e for n in names for e in ('.nii.gz', '.json', '.png'))
    for n in names:
        img, x = _se_read(a / f'{n}.nii.gz')
        assert x.shape == (32, 32, 32) and x.dtype == np.int16  # CT: int16 Hounsfield units
        assert np.allclose(img.affine, np.array(meta['affine']))
        assert ''.join(nib.aff2axcodes(img.affine)) == meta['orientation']
        assert int(img.header['qform_code']) == 1 and int(img.header['sform_code']) == 1
        assert img.header.get_xyzt_units()[0] == 'mm'
        assert -1024 <= x.min() and x.max() <= 600 and x.std() > 0
        # same seed, other batch size and slab-wise G^H: the same volume (to 1 HU of float rounding)
        _, y = _se_read(b / f'{n}.nii.gz')
        assert np.abs(x.astype(int) - y).max() <= 1 and (x == y).mean() > 0.99
        side = json.load(open(a / f'{n}.json'))
        assert side['seed'] == int(n[4:]) and side['iter_num'] == 7
        png = open(a / f'{n}.png', 'rb').read()
        assert png[:8] == b'\x89PNG\r\n\x1a\n'
        w, h = int.from_bytes(png[16:20], 'big'), int.from_bytes(png[20:24], 'big')
        assert w == 3 * h  # one row: axial | coronal | sagittal
    # different seeds give different volumes
    assert not np.array_equal(_se_read(a / f'{names[0]}.nii.gz')[1], _se_read(a / f'{names[1]}.nii.gz')[1])


def test_sample_never_overwrites_and_fails_in_one_line(se_demo, tmp_path):
    out = tmp_path / 's'
    rc, _, err = _se_run('sample.py', f'--ckpt={se_demo["ckpt"]}', f'--out={out}', '--num=1')
    assert rc == 0, err
    f = out / 'seed001337.nii.gz'
    before = f.read_bytes()
    os.utime(f, (0, 0))
    with pytest.raises(SystemExit, match='exists.*--overwrite'):
        sample.main([f'--ckpt={se_demo["ckpt"]}', f'--out={out}', '--num=1'])
    assert os.stat(f).st_mtime == 0 and f.read_bytes() == before
    sample.main([f'--ckpt={se_demo["ckpt"]}', f'--out={out}', '--num=1', '--overwrite'])
    assert os.stat(f).st_mtime > 0 and f.read_bytes() == before  # rewritten, same seed, same bytes
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    for args, msg in [([f'--ckpt={tmp_path / "missing.pt"}'], 'no checkpoint'),
                      ([f'--ckpt={bad}'], 'unreadable checkpoint'),
                      ([f'--ckpt={se_demo["ckpt_c"]}', '--label=5'], 'unknown label'),
                      ([f'--ckpt={se_demo["ckpt"]}', '--label=1'], 'unconditional'),
                      ([f'--ckpt={se_demo["ckpt"]}', f'--out={blocker / "sub"}'], 'cannot write'),
                      (['--nmu=3'], 'unknown config key')]:
        with pytest.raises(SystemExit) as e:
            sample.main([f'--out={tmp_path / "e"}'] + args)
        assert str(e.value).startswith('error: ') and msg in str(e.value) and '\n' not in str(e.value)
    assert not (tmp_path / 'e').exists() or os.listdir(tmp_path / 'e') == []
    # the script itself: one line on stderr, non-zero exit, no traceback
    _se_one_line_error(*_se_run('sample.py', f'--ckpt={bad}', f'--out={tmp_path / "e"}')[::2])


def test_sample_conditional_labels_in_turn(se_demo, tmp_path):
    sample.main([f'--ckpt={se_demo["ckpt_c"]}', f'--out={tmp_path}', '--num=3', '--batch=2'])
    assert [json.load(open(tmp_path / f'seed{1337 + i:06d}.json'))['class'] for i in range(3)] == [0, 1, 2]
    sample.main([f'--ckpt={se_demo["ckpt_c"]}', f'--out={tmp_path / "l"}', '--num=2', '--label=4'])
    assert [json.load(open(tmp_path / 'l' / f'seed{1337 + i:06d}.json'))['class'] for i in range(2)] == [4, 4]


def test_ct_round_trip_prepared_phantom_back_to_hu(se_demo, tmp_path):
    lo, hi = se_demo['meta']['window']
    # HU -> prepare's window -> float16 store -> sample's inverse: within float16 rounding plus 0.5 HU
    hu = np.random.default_rng(0).uniform(lo, hi, size=(32, 32, 32)).astype(np.float32)
    hu[0, 0, :2] = [-3000, 3000]  # outside the window: clipped to its ends
    stored = to_unit(hu, (lo, hi)).astype(np.float16)
    sample.write_volume(str(tmp_path / 'rt.nii.gz'), stored.astype(np.float32), se_demo['meta'])
    _, back = _se_read(tmp_path / 'rt.nii.gz')
    tol = (hi - lo) / 2 * 2.0 ** -11 + 0.5 + 1e-3
    ref = np.clip(hu, lo, hi)
    assert back.dtype == np.int16 and np.abs(back - ref).max() <= tol
    assert back[0, 0, 0] == lo and back[0, 0, 1] == hi
    # a prepared demo phantom written as HU reads back as the same prepared volume
    x = VolumeDataset(se_demo['data'], 'all').volume(0)
    sample.write_volume(str(tmp_path / 'ph.nii.gz'), x, se_demo['meta'])
    _, ph = _se_read(tmp_path / 'ph.nii.gz')
    assert np.abs(to_unit(ph.astype(np.float32), (lo, hi)) - x).max() <= 1 / (hi - lo) + 1e-6  # half an HU


def test_encode_features_recon_regress_and_direction_for_sample(se_demo, tmp_path):
    out = tmp_path / 'f'
    rc, stdout, err = _se_run('encode.py', f'--data={se_demo["data"]}', f'--ckpt={se_demo["ckpt"]}', f'--out={out}',
                              '--recon=1', '--regress=lung_volume_ml,pct_below_950', '--direction', 'lung_volume_ml')
    assert rc == 0, err
    ds = VolumeDataset(se_demo['data'], 'all')
    Z = np.load(out / 'features.npy')
    assert Z.shape == (12, 16) and Z.dtype == np.float32 and np.all(np.isfinite(Z))
    rows = list(csv.DictReader(open(out / 'ids.csv')))
    assert [r['id'] for r in rows] == ds.ids
    assert np.allclose([float(r['lung_volume_ml']) for r in rows], ds.labels['lung_volume_ml'])
    model, _ = load_checkpoint(se_demo['ckpt'])
    z3 = model.encode(torch.from_numpy(ds.volume(3))[None, None]).numpy()[0]
    assert np.allclose(Z[3], z3, atol=1e-5)
    # the reconstruction and its prepared original, as HU NIfTI with the dataset's affine
    for kind in ('orig', 'recon'):
        img, x = _se_read(out / f'{ds.ids[0]}_{kind}.nii.gz')
        assert x.shape == (32, 32, 32) and np.allclose(img.affine, se_demo['meta']['affine'])
    assert 'PSNR' in stdout and 'L1' in stdout
    reg = json.load(open(out / 'regress.json'))
    assert set(reg) == {'lung_volume_ml', 'pct_below_950'}
    assert reg['lung_volume_ml']['target'] == 'log(lung_volume_ml)' and len(reg['lung_volume_ml']['r2_per_fold']) == 5
    # sample.py walks the direction: the linear model's prediction rises along it, through z(seed) at t=0
    w = np.load(out / 'direction_lung_volume_ml.npy')
    info = json.load(open(out / 'direction_lung_volume_ml.json'))
    assert w.shape == (16,) and info['column'] == 'lung_volume_ml'
    s = tmp_path / 's'
    rc, _, err = _se_run('sample.py', f'--ckpt={se_demo["ckpt"]}', f'--out={s}',
                         f'--direction={out / "direction_lung_volume_ml.npy"}', '--steps=3', '--scale=2', '--png')
    assert rc == 0, err
    preds = [json.load(open(s / f'direction_lung_volume_ml_s1337_{k:02d}.json'))['predicted']['lung_volume_ml']
             for k in range(3)]
    z0 = sample.seed_z(1337, 16).double().numpy()
    assert preds[0] < preds[1] < preds[2]
    assert preds[1] == pytest.approx(info['intercept'] + w.astype(np.float64) @ z0, rel=1e-4)
    assert preds[2] - preds[1] == pytest.approx(2 * np.linalg.norm(w.astype(np.float64)), rel=1e-4)
    assert (s / 'direction_lung_volume_ml_s1337.png').exists()
    assert nib.load(str(s / 'direction_lung_volume_ml_s1337_02.nii.gz')).shape == (32, 32, 32)


def test_sample_interpolation_ends_at_both_seeds(se_demo, tmp_path):
    sample.main([f'--ckpt={se_demo["ckpt"]}', f'--out={tmp_path / "i"}', '--interp=3', '--seed=5', '--seed2=9'])
    sample.main([f'--ckpt={se_demo["ckpt"]}', f'--out={tmp_path / "s"}', '--num=1', '--seed=9'])
    _, end = _se_read(tmp_path / 'i' / 'interp_5_9_02.nii.gz')
    _, ref = _se_read(tmp_path / 's' / 'seed000009.nii.gz')
    assert np.abs(end.astype(int) - ref).max() <= 1
    z0, z1 = sample.seed_z(5, 16), sample.seed_z(9, 16)
    mid = sample.slerp(z0, z1, 0.5)
    assert torch.allclose(sample.slerp(z0, z1, 0.0), z0, atol=1e-5) and torch.allclose(sample.slerp(z0, z1, 1.0), z1, atol=1e-5)
    assert abs(mid.norm() - (z0.norm() + z1.norm()) / 2) < 0.1 * z0.norm()  # slerp keeps the norm


def test_ridge_matches_direct_least_squares_and_r2():
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
    # cross-validation recovers a linear log-target on synthetic features
    Z = rng.standard_normal((50, 6))
    t = np.exp(Z @ rng.standard_normal(6) * 0.3 + 2)
    res = encode.cross_validate(Z, t, np.arange(50) % 5, lam=1e-4, log=True)
    assert sorted(res) == [0, 1, 2, 3, 4] and min(res.values()) > 0.999
    with pytest.raises(ValueError, match='log'):
        encode.cross_validate(Z, t - 100, np.arange(50) % 5)


def test_encode_bad_input_writes_nothing(se_demo, tmp_path):
    out = tmp_path / 'f'
    base = [f'--data={se_demo["data"]}', f'--ckpt={se_demo["ckpt"]}', f'--out={out}']
    for args, msg in [(['--regress=fev1'], "unknown label column 'fev1'"),
                      (['--direction=nope'], 'unknown label column'),
                      ([f'--data={tmp_path / "none"}'], 'no such file'),
                      ([f'--ckpt={tmp_path / "missing.pt"}'], 'no checkpoint')]:
        with pytest.raises(SystemExit) as e:
            encode.main(base + args)
        assert str(e.value).startswith('error: ') and msg in str(e.value)
        assert not out.exists() or os.listdir(out) == []
    encode.main(base)
    with pytest.raises(SystemExit, match='exists'):
        encode.main(base)
    # NIfTI files, prepared on the fly with the checkpoint's meta, give the prepared folder's features
    raw = os.path.join(se_demo['data'], 'raw')
    encode.main([f'--data={raw}', f'--ckpt={se_demo["ckpt"]}', f'--out={tmp_path / "n"}'])
    ids = [r['id'] for r in csv.DictReader(open(tmp_path / 'n' / 'ids.csv'))]
    Zn, Zp = np.load(tmp_path / 'n' / 'features.npy'), np.load(out / 'features.npy')
    order = [ids.index(i) for i in VolumeDataset(se_demo['data'], 'all').ids]
    assert np.allclose(Zn[order], Zp, atol=1e-2)  # float16 store vs float32 on the fly


def test_output_affine_from_orientation_codes_and_rescaled_grids(se_demo):
    for codes in ('SPL', 'RAS', 'LPI'):
        A = sample.output_affine(dict(orientation=codes, spacing=[1.0, 2.0, 3.0]), (32, 64, 96))
        assert ''.join(nib.aff2axcodes(A)) == codes
        assert np.allclose(np.sqrt((A[:3, :3] ** 2).sum(0)), [1, 2, 3]) and np.allclose(A @ [15.5, 31.5, 47.5, 1], [0, 0, 0, 1])
    # a model of another size than the data (e.g. official weights with this meta): same field of view and centre
    meta = se_demo['meta']
    A32, A64 = np.array(meta['affine']), sample.output_affine(meta, (64, 64, 64))
    assert ''.join(nib.aff2axcodes(A64)) == meta['orientation']
    assert np.allclose(A64[:3, :3], A32[:3, :3] / 2)
    assert np.allclose(A64 @ [31.5, 31.5, 31.5, 1], A32 @ [15.5, 15.5, 15.5, 1])
