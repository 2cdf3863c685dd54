# Tests for prepare.py (to be merged into test_hagan.py).  Run: python -m pytest -q _wip_test_prepare.py
import os
import csv
import gzip
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import nibabel as nib

import prepare

NIB_DATA = os.path.join(os.path.dirname(nib.__file__), 'tests', 'data')


def _prep_rows(out):
    with open(os.path.join(out, 'volumes.csv'), newline='') as f:
        rows = {}
        for r in csv.DictReader(f):
            rows.setdefault(r['id'], r)  # a duplicate id keeps its first row
        return rows


def _prep_smooth(shape, seed=0):
    # a smooth random volume with a zero border, like a scan's body in air
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1) + tuple(max(2, s // 4) for s in shape), generator=g)
    x = F.interpolate(x, size=shape, mode='trilinear', align_corners=False)[0, 0].numpy()
    return (1000 * x).astype(np.float32)


def _prep_demo(tmp_path, num=10, size=32):
    out = str(tmp_path / 'demo')
    assert prepare.make_demo(out, num=num, img_size=size, log=lambda *a: None) == 0
    return out


@pytest.fixture(scope='module')
def prep_demo_dir(tmp_path_factory):
    return _prep_demo(tmp_path_factory.mktemp('prep'))


def test_prep_unit_mapping():
    w = prepare.CT_WINDOW
    x = np.array([-2000, -1024, -212, 600, 3000], dtype=np.float32)
    u = prepare.to_unit(x, w)
    assert np.allclose(u, [-1, -1, 0, 1, 1], atol=1e-6)
    assert np.allclose(prepare.from_unit(u[1:4], w), x[1:4], atol=1e-3)
    t = prepare.to_unit(torch.tensor([-212.0]), w)
    assert abs(float(t) - 0.0) < 1e-6
    assert prepare.parse_size(64) == (64, 64, 64) and prepare.parse_size('64,32,32') == (64, 32, 32)
    with pytest.raises(AssertionError):
        prepare.parse_size(48)


def test_prep_load_volume_orientations(tmp_path):
    # anatomical.nii is stored L-A-S: ours is S-P-L = transpose and flip the A axis
    raw = np.asarray(nib.load(os.path.join(NIB_DATA, 'anatomical.nii')).dataobj, dtype=np.float32)
    vol, aff, sp = prepare.load_volume(os.path.join(NIB_DATA, 'anatomical.nii'))
    assert np.array_equal(vol, np.flip(raw.transpose(2, 1, 0), 1))
    assert nib.aff2axcodes(aff) == ('S', 'P', 'L') and np.allclose(sp, 2.0)
    # tiny.mnc (MINC1) is stored S-A-R: flip axes 1 and 2
    raw = np.asarray(nib.load(os.path.join(NIB_DATA, 'tiny.mnc')).dataobj, dtype=np.float32)
    vol, aff, sp = prepare.load_volume(os.path.join(NIB_DATA, 'tiny.mnc'))
    assert vol.shape == (10, 20, 20) and np.array_equal(vol, np.flip(raw, (1, 2)))
    assert nib.aff2axcodes(aff) == ('S', 'P', 'L')
    # AFNI BRIK, R-A-S with a trailing singleton 4th dim
    raw = np.asarray(nib.load(os.path.join(NIB_DATA, 'scaled+tlrc.BRIK')).dataobj, dtype=np.float32)[..., 0]
    vol, aff, sp = prepare.load_volume(os.path.join(NIB_DATA, 'scaled+tlrc.BRIK'))
    assert np.array_equal(vol, np.flip(raw.transpose(2, 1, 0), (1, 2)))
    # an MGZ in FreeSurfer's conformed L-I-A orientation, written here
    data = _prep_smooth((20, 24, 16))
    lia = np.array([[-1, 0, 0, 10], [0, 0, 1, -8], [0, -1, 0, 12], [0, 0, 0, 1]], dtype=np.float64)
    p = str(tmp_path / 'brain.mgz')
    nib.save(nib.MGHImage(data, lia), p)
    vol, aff, sp = prepare.load_volume(p)
    assert np.array_equal(vol, np.flip(data.transpose(1, 2, 0), (0, 1)))
    assert nib.aff2axcodes(aff) == ('S', 'P', 'L')
    # the returned affine maps stored voxels to the same world points as the file's
    ijk = np.array([3, 5, 7, 1.0])  # stored index -> source index, by the orientation transform above
    src = np.array([7, 24 - 1 - 3, 16 - 1 - 5, 1.0])
    assert np.allclose(aff @ ijk, lia @ src)


def test_prep_flipped_permuted_affine_same_array(tmp_path):
    img = nib.load(os.path.join(NIB_DATA, 'anatomical.nii'))
    img = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    # same physical image, stored with axes permuted and two of them flipped
    ornt = np.array([[2, -1], [0, 1], [1, -1]])
    moved = img.as_reoriented(ornt)
    assert moved.shape != img.shape
    a, b = str(tmp_path / 'a.nii'), str(tmp_path / 'b.nii.gz')
    img.to_filename(a)
    moved.to_filename(b)
    meta = dict(img_size=[32, 32, 32], modality='mri', window=None)
    ha, la = prepare.prepare_file(a, meta)
    hb, lb = prepare.prepare_file(b, meta)
    assert ha.shape == (32, 32, 32) and la.shape == (8, 8, 8)
    assert np.array_equal(ha, hb) and np.array_equal(la, lb)
    assert ha.min() >= -1 and ha.max() <= 1 and ha.max() > 0.5


def test_prep_real_files_and_bad_inputs(tmp_path, capsys):
    src = tmp_path / 'in'
    (src / 'sub').mkdir(parents=True)
    for f in ['anatomical.nii', 'example4d.nii.gz', 'tiny.mnc', 'scaled+tlrc.BRIK', 'scaled+tlrc.HEAD', 'small.mnc']:
        shutil.copy(os.path.join(NIB_DATA, f), src / f)
    nib.save(nib.MGHImage(_prep_smooth((20, 24, 16)), np.diag([1.0, 1, 1, 1])), str(src / 'sub' / 'brain.mgz'))
    # truncated .nii.gz: a valid header, then the stream stops
    full = gzip.compress(nib.Nifti1Image(_prep_smooth((40, 40, 40)), np.eye(4)).to_bytes())
    (src / 'cut.nii.gz').write_bytes(full[:len(full) // 2])
    (src / 'garbage.nii').write_bytes(b'not an image at all' * 10)
    nib.save(nib.Nifti1Image(np.ones((30, 30), np.float32), np.eye(4)), str(src / 'flat.nii'))
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), 7, np.float32), np.eye(4)), str(src / 'const.nii'))
    nanvol = _prep_smooth((24, 24, 24), 1)
    nanvol[5:8, 5:8, 5:8] = np.nan
    nanvol[0, 0, 0] = np.inf
    np.save(src / 'nans.npy', nanvol)
    np.save(src / 'allnan.npy', np.full((8, 8, 8), np.nan, np.float32))
    nib.save(nib.Nifti1Image(_prep_smooth((16, 16, 16)), np.eye(4)), str(src / 'sub' / 'tiny.nii'))  # id clash
    out = str(tmp_path / 'out')
    rc = prepare.prepare_dataset([str(src)], out, img_size=32, modality='mri', workers=1)
    assert rc == 0
    rows = _prep_rows(out)
    st = {k: (r['status'], r['reason']) for k, r in rows.items()}
    for vid in ['anatomical', 'tiny', 'scaled+tlrc', 'brain', 'nans']:
        assert st[vid] == ('ok', ''), (vid, st[vid])
    expect = {'example4d': '--first_volume', 'small': 'h5py', 'cut': 'truncated', 'garbage': 'not an image',
              'flat': '2D image', 'const': 'constant volume', 'allnan': 'no finite voxels'}
    for vid, why in expect.items():
        assert st[vid][0] == 'skipped' and why in st[vid][1], (vid, st[vid])
        assert vid in st[vid][1]  # the reason names the file
    # the sub/tiny.nii clashes with tiny.mnc: one of them is skipped as a duplicate
    dup = [r for r in csv.DictReader(open(os.path.join(out, 'volumes.csv'))) if 'duplicate id tiny' in r['reason']]
    assert len(dup) == 1
    assert rows['nans']['nonfinite'] == str(27 + 1)
    assert rows['anatomical']['orig_shape'] == '25x41x33' and rows['anatomical']['orig_axcodes'] == 'SPL'
    meta = json.load(open(os.path.join(out, 'meta.json')))
    assert meta['complete'] and meta['img_size'] == [32, 32, 32] and meta['window'] is None
    assert meta['num_volumes'] == 5 and meta['orientation'] == 'SPL'
    assert nib.aff2axcodes(np.array(meta['affine'])) == ('S', 'P', 'L')
    hi = np.load(os.path.join(out, 'hires.npy'))
    lo = np.load(os.path.join(out, 'lowres.npy'))
    n = len(open(os.path.join(out, 'volumes.csv')).read().splitlines()) - 1  # one row per input
    assert n == 13 and meta['num_inputs'] == 13
    assert hi.dtype == np.float16 and hi.shape == (n, 32, 32, 32) and lo.shape == (n, 8, 8, 8)
    ok = [int(r['index']) for r in rows.values() if r['status'] == 'ok']
    assert np.isfinite(hi[ok]).all() and hi[ok].min() >= -1 and hi[ok].max() <= 1
    pooled = F.avg_pool3d(torch.from_numpy(hi[ok].astype(np.float32))[:, None], 4)[:, 0].numpy()
    assert np.abs(pooled - lo[ok]).max() < 2e-3  # low-res = block means (of the float32 hires)
    # the NaN voxels became background in source space
    ds = prepare.VolumeDataset(out, split='all')
    assert set(ds.ids) == {'anatomical', 'tiny', 'scaled+tlrc', 'brain', 'nans'} and len(ds) == 5
    captured = capsys.readouterr().out
    assert '5 ok' in captured and 'skipped' in captured
    # --first_volume takes volume 0 of the 4D series
    out4 = str(tmp_path / 'out4')
    assert prepare.prepare_dataset([str(src / 'example4d.nii.gz')], out4, 32, 'mri', first_volume=True) == 0
    img = nib.load(str(src / 'example4d.nii.gz'))
    first = str(tmp_path / 'first.nii')
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), first)
    h, _ = prepare.prepare_file(first, meta)
    assert np.array_equal(np.load(os.path.join(out4, 'hires.npy'))[0], h.astype(np.float16))


def test_prep_nothing_prepared_and_unwritable(tmp_path, capsys):
    (tmp_path / 'afile').write_text('x')
    rc = prepare.prepare_dataset([os.path.join(NIB_DATA, 'anatomical.nii')], str(tmp_path / 'afile' / 'out'), 32)
    assert rc == 1 and 'not writable' in capsys.readouterr().out
    rc = prepare.prepare_dataset([os.path.join(NIB_DATA, 'small.mnc')], str(tmp_path / 'o2'), 32)
    assert rc == 1 and 'nothing was prepared' in capsys.readouterr().out
    assert not os.path.exists(tmp_path / 'o2' / 'meta.json')
    with pytest.raises(FileNotFoundError, match='meta.json missing'):
        prepare.VolumeDataset(str(tmp_path / 'o2'))


def test_prep_trim_nan_and_antialias():
    body = _prep_smooth((20, 24, 24), 3) - 1024  # HU, nowhere blank
    padded = np.full((30, 24, 24), -1024.0, np.float32)
    padded[4:24] = body
    padded[25] = np.nan  # a NaN slice among the blank ones is background too
    sp = np.array([2.0, 1.5, 1.5])
    src_aff = np.diag([2.0, 1.5, 1.5, 1.0])
    a, ia = prepare.prepare_array(padded, sp, 32, affine=src_aff)
    b, ib = prepare.prepare_array(body, sp, 32)
    assert ia['trim'] == (4, 6) and ib['trim'] == (0, 0)
    # out_affine: the stored grid's centre is the world centre of the trimmed body; its columns are the spacing
    oa = ia['out_affine']
    assert np.allclose(oa @ [15.5, 15.5, 15.5, 1], src_aff @ [4 + 9.5, 11.5, 11.5, 1])
    assert np.allclose(np.sqrt((oa[:3, :3] ** 2).sum(0)), ia['out_spacing'])
    assert np.array_equal(a, b)
    # physical aspect ratio kept: 20*2 = 40 mm deep vs 24*1.5 = 36 mm wide -> 40/32 mm voxels, W padded
    assert np.allclose(ia['out_spacing'], 40 / 32)
    assert (a[:, :, 0] == -1).all() and (a[:, :, 16] > -1).any()
    # stretch: the official plain resize, no padding
    s, info = prepare.prepare_array(body, sp, 32, stretch=True)
    assert (s[:, :, 0] > -1).any() and np.allclose(info['out_spacing'], [40 / 32, 36 / 32, 36 / 32])
    # --spacing: isotropic mm then centre crop/pad
    s, info = prepare.prepare_array(body, sp, 32, out_spacing=3.0)
    assert np.allclose(info['out_spacing'], 3.0) and (s[:9] == -1).all()
    # shrinking is anti-aliased: alternating slices average to grey instead of aliasing to +-1
    stripes = np.zeros((64, 64, 64), np.float32)
    stripes[::2] = 600
    stripes[1::2] = -1024 + 200
    g, _ = prepare.prepare_array(stripes, np.ones(3), 32, window=(-1024, 600))
    mid = prepare.to_unit(np.float32((600 - 824) / 2), (-1024, 600))
    assert np.abs(g[2:-2, 2:-2, 2:-2] - mid).max() < 0.02
    with pytest.raises(ValueError, match='constant volume'):
        prepare.prepare_array(np.zeros((8, 8, 8), np.float32), np.ones(3), 32)
    with pytest.raises(ValueError, match='empty'):
        prepare.prepare_array(np.full((8, 8, 8), -3000, np.float32) + np.arange(8.0), np.ones(3), 32)


def test_prep_get_batch_slices_and_split(prep_demo_dir):
    out = prep_demo_dir
    meta = json.load(open(os.path.join(out, 'meta.json')))
    assert meta['class_column'] == 'class' and meta['num_classes'] == 5 and meta['num_volumes'] == 10
    tr = prepare.VolumeDataset(out, 'train', fold=1)
    va = prepare.VolumeDataset(out, 'val', fold=1)
    al = prepare.VolumeDataset(out, 'all')
    assert len(tr) + len(va) == len(al) == 10 and len(va) == 2 and not set(tr.ids) & set(va.ids)
    assert tr.img_size == (32, 32, 32)
    hi = np.load(os.path.join(out, 'hires.npy'))
    lo = np.load(os.path.join(out, 'lowres.npy'))
    for r in [0, 3, 7]:  # r on the A grid: 0 .. D/4 - D/32 = 7
        g = torch.Generator().manual_seed(r)
        slabs, lows, y = tr.get_batch(3, r, 'cpu', g)
        assert slabs.shape == (3, 1, 4, 32, 32) and lows.shape == (3, 1, 8, 8, 8)
        assert slabs.dtype == lows.dtype == torch.float32 and y.dtype == torch.int64
        ix = torch.randint(len(tr), (3,), generator=torch.Generator().manual_seed(r)).numpy()
        for k, j in enumerate(ix):
            row = tr.index[j]
            assert np.array_equal(slabs[k, 0].numpy(), hi[row, 4 * r:4 * r + 4].astype(np.float32))
            assert np.array_equal(lows[k, 0].numpy(), lo[row].astype(np.float32))
            assert int(y[k]) == tr.labels['class'][j]
            assert np.array_equal(tr.volume(j), hi[row].astype(np.float32))
            assert np.array_equal(tr.lowres(j), lo[row].astype(np.float32))
    with pytest.raises(AssertionError):
        tr.get_batch(2, 8)
    # folds are a deterministic function of the ids (and classes): stratified, every fold used
    rows = _prep_rows(out)
    folds = [int(r['fold']) for r in rows.values()]
    assert sorted(folds) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert prepare._fold_of(list(rows), [int(r['class']) for r in rows.values()]) == folds


def test_prep_demo_phantom_hu_and_labels(prep_demo_dir):
    rng = np.random.default_rng(5)
    hu, aff, lab = prepare.make_phantom(rng, 3, 64)
    assert hu.dtype == np.int16 and hu.shape[:2] == (64, 64) and nib.aff2axcodes(aff) == ('L', 'P', 'S')
    assert hu.min() == -1024 and 500 < hu.max() < 3071
    assert abs(np.median(hu[hu < -990]) + 1000) < 25  # air
    assert ((hu > -150) & (hu < -60)).mean() > 0.01  # fat
    assert ((hu > 20) & (hu < 70)).mean() > 0.02  # muscle / heart
    assert (hu > 300).mean() > 0.0005  # bone
    assert 2000 < lab['lung_volume_ml'] < 8000 and 15 < lab['pct_below_950'] < 40
    # the labels.csv that went through preparation: emphysema index grows with class
    ds = prepare.VolumeDataset(prep_demo_dir, 'all')
    c, p = ds.labels['class'], ds.labels['pct_below_950']
    assert sorted(set(c.tolist())) == [0, 1, 2, 3, 4] and c.dtype == np.int64
    means = [p[c == k].mean() for k in range(5)]
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert np.all(ds.labels['lung_volume_ml'] > 1000)
    v = ds.volume(0)
    assert v.shape == (32, 32, 32) and v.min() == -1 and v.max() > 0.2  # air is -1, bone bright


def test_prep_resume_after_kill(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    for k in range(6):
        nib.save(nib.Nifti1Image(_prep_smooth((20 + k, 24, 24), k) - 1024, np.diag([1.2, 1, 1, 1])),
                 str(src / f'v{k}.nii.gz'))
    (src / 'labels.csv').write_text('id,class,fev1\n' + ''.join(f'v{k},{k % 2},{k * 0.5}\n' for k in range(6))
                                    + 'ghost,1,0\n')
    ref = str(tmp_path / 'ref')
    assert prepare.prepare_dataset([str(src)], ref, 32, labels=str(src / 'labels.csv'), log=lambda *a: None) == 0
    out = str(tmp_path / 'out')

    class Killed(Exception):
        pass

    def kill(n):
        if n == 3:
            raise Killed()
    with pytest.raises(Killed):
        prepare.prepare_dataset([str(src)], out, 32, labels=str(src / 'labels.csv'), on_done=kill, log=lambda *a: None)
    assert not os.path.exists(os.path.join(out, 'meta.json'))  # incomplete = not a dataset
    with pytest.raises(FileNotFoundError):
        prepare.VolumeDataset(out)
    # a volume half-written when the kill came: garbage in its slot, no progress line
    hi = np.load(os.path.join(out, 'hires.npy'), mmap_mode='r+')
    hi[4, :5] = 7
    hi.flush()
    del hi
    with open(os.path.join(out, '_progress.jsonl'), 'a') as f:
        f.write('{"index": 4, "sta')  # a line cut short
    log = []
    assert prepare.prepare_dataset([str(src)], out, 32, labels=str(src / 'labels.csv'), log=log.append) == 0
    assert any('resuming, 3/6' in ln for ln in log)
    assert sum(ln.startswith('[') for ln in log) == 3  # only the other 3 were prepared again
    assert any('ghost' in ln and 'no input volume' in ln for ln in log)
    for name in ['hires.npy', 'lowres.npy']:
        assert np.array_equal(np.load(os.path.join(ref, name)), np.load(os.path.join(out, name)))
    a, b = _prep_rows(ref), _prep_rows(out)
    strip = lambda rows: {k: {c: v for c, v in r.items() if c not in ('source',)} for k, r in rows.items()}
    assert strip(a) == strip(b)
    assert a['v3']['fev1'] == '1.5' and a['v3']['class'] == '1'
    # re-running a complete folder does nothing; a different command is refused there
    log = []
    assert prepare.prepare_dataset([str(src)], out, 32, labels=str(src / 'labels.csv'), log=log.append) == 0
    assert 'already complete' in log[-1]
    assert prepare.prepare_dataset([str(src)], out, 64, log=log.append) == 1 and 'different' in log[-1]


def test_prep_noncubic_and_npy(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    for k in range(3):
        np.save(src / f'n{k}.npy', _prep_smooth((40, 20, 30), k) - 1024)
    (tmp_path / 'list.txt').write_text(''.join(f'in/n{k}.npy\n' for k in range(3)) + 'in/missing.npy\n')
    out = str(tmp_path / 'out')
    assert prepare.prepare_dataset([str(tmp_path / 'list.txt')], out, '64,32,32', log=lambda *a: None) == 0
    rows = _prep_rows(out)
    assert rows['missing']['status'] == 'skipped' and 'no such file' in rows['missing']['reason']
    ds = prepare.VolumeDataset(out, 'all')
    assert ds.img_size == (64, 32, 32) and len(ds) == 3
    s, l, y = ds.get_batch(2, 8 - 2, generator=torch.Generator().manual_seed(0))  # r max = 64/4 - 64/32
    assert s.shape == (2, 1, 8, 32, 32) and l.shape == (2, 1, 16, 8, 8) and (y == 0).all()
    assert ds.meta['num_classes'] == 0 and ds.meta['class_column'] == ''


def test_prep_cli_demo(tmp_path):
    import subprocess
    import sys
    out = str(tmp_path / 'd')
    here = os.path.dirname(os.path.abspath(prepare.__file__))
    p = subprocess.run([sys.executable, os.path.join(here, 'prepare.py'), '--demo', '--out', out, '--num=6',
                        '--img_size=32', '--workers=2'], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert '6 ok, 0 skipped' in p.stdout
    p = subprocess.run([sys.executable, os.path.join(here, 'prepare.py'), '--bogus=1'], capture_output=True, text=True)
    assert p.returncode != 0 and 'unknown option --bogus' in p.stderr
    ref = str(tmp_path / 'ref')
    assert prepare.make_demo(ref, num=6, img_size=32, log=lambda *a: None) == 0  # 1 worker, in-process
    assert np.array_equal(np.load(os.path.join(out, 'hires.npy')), np.load(os.path.join(ref, 'hires.npy')))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_prep_get_batch_cuda_matches_cpu(prep_demo_dir):
    ds = prepare.VolumeDataset(prep_demo_dir, 'all')
    for it in range(4):  # more calls than staging buffers
        a = ds.get_batch(3, it, 'cpu', torch.Generator().manual_seed(it))
        b = ds.get_batch(3, it, 'cuda', torch.Generator().manual_seed(it))
        for x, y in zip(a, b):
            assert y.device.type == 'cuda' and x.dtype == y.dtype and torch.equal(x, y.cpu())


def test_prep_save_montage_png(tmp_path):
    import zlib
    import struct
    v = np.linspace(-1, 1, 32 * 32 * 32, dtype=np.float32).reshape(32, 32, 32)
    p = str(tmp_path / 'm' / 'x.png')
    prepare.save_montage(p, [v, -v])
    data = open(p, 'rb').read()
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    w, h = struct.unpack('>II', data[16:24])
    assert (w, h) == (3 * 34 * 4, 2 * 34 * 4)  # 3 panels + 2 px gaps, 2 rows, enlarged 4x
    n = struct.unpack('>I', data[33:37])[0]
    assert data[37:41] == b'IDAT'
    px = np.frombuffer(zlib.decompress(data[41:41 + n]), np.uint8).reshape(h, 1 + w)[:, 1:]
    assert px[0, 0] == round((v[16, 0, 0] + 1) * 127.5) or abs(int(px[0, 0]) - (v[16, 0, 0] + 1) * 127.5) <= 1


def test_prep_get_batch_never_overwrites_held_batches(prep_demo_dir):
    # get_batch recycles CPU output tensors: only ones the caller no longer holds, in any form
    ds = prepare.VolumeDataset(prep_demo_dir, 'all')
    g = torch.Generator().manual_seed(0)
    held, views, arrays, copies = [], [], [], []
    for it in range(12):
        s, l, y = ds.get_batch(2, it % 8, generator=g)
        if it % 3 == 0:
            held.append(s)
            copies.append(s.clone())
        elif it % 3 == 1:
            views.append(s[:, 0, 1:3])
            copies.append(s[:, 0, 1:3].clone())
        else:
            arrays.append(l.numpy())
            copies.append(l.clone())
        del s, l, y
    assert all(torch.equal(a, b) for a, b in zip(held, copies[0::3]))
    assert all(torch.equal(a, b) for a, b in zip(views, copies[1::3]))
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(arrays, copies[2::3]))
    assert len(ds._out[(2, 1, 4, 32, 32)]) <= 4  # the pool stays small
