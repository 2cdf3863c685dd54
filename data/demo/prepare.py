"""
The demo data set: procedural CT thorax phantoms in Hounsfield units with an emphysema class 0-4, written as
NIfTI scans plus a labels.csv into data/demo/raw, then prepared by ../../prepare.py exactly like real scans
into data/demo. Re-running the same command resumes, as prepare.py does.

    python data/demo/prepare.py                                   # 128 phantoms at 64^3 (the README's demo)
    python data/demo/prepare.py --out=data/tiny --num=10 --img_size=32
    python train.py config/train_demo.py                          # then train on them
"""

import csv
import os
import sys
import time

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from configurator import fail, override  # noqa: E402 (the repository root is on the path from here on)
from prepare import parse_size, prepare_dataset, write_atomic  # noqa: E402

# -----------------------------------------------------------------------------
config = dict(
    out=os.path.dirname(__file__) or ".",  # the store's folder (data/demo); phantoms go to OUT/raw
    num=128,  # number of phantoms; classes 0-4 in turn
    img_size=64,  # S of the store (or D,H,W); the phantoms are drawn finer and prepared down to it
    seed=1337,  # phantom k is drawn from (seed, k)
    workers=1,  # prepare.py's worker processes
)
RANGES = dict(num=">=1", seed=">=0", workers=">=1")  # configurator's rules; img_size by parse_size
# -----------------------------------------------------------------------------


def _smooth_noise(rng, shape, cells):
    """Gaussian noise on a coarse grid of `cells` per axis, trilinearly upsampled to shape: blobs ~shape/cells."""
    g = torch.from_numpy(rng.standard_normal([max(2, int(c)) for c in cells]).astype(np.float32))
    return F.interpolate(g[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def make_phantom(rng, cls, n_xy=128):
    """One CT-like thorax in HU -> (int16 [X,Y,Z] in LPS voxel order, affine, labels: class, lung_volume_ml,
    pct_below_950, the usual emphysema index). Body with fat and muscle, two lungs whose low-attenuation fraction
    grows with cls 0..4, heart, aorta, spine and ribs; size, shape and position vary per case."""
    fov = rng.uniform(340, 420)                          # mm, reconstruction field of view
    sxy = fov / n_xy
    sz = rng.choice([2.0, 2.5, 3.0]) * 128 / n_xy       # thinner slices at higher in-plane resolution
    zext = rng.uniform(260, 340)                         # mm of scan length
    nz = int(round(zext / sz))
    # world (RAS+, mm) coordinates of voxel centres; voxel axes run to patient Left, Posterior, Superior
    x0, y0 = rng.uniform(-10, 10, size=2)
    X = (x0 - (np.arange(n_xy) - (n_xy - 1) / 2) * sxy).astype(np.float32)[:, None, None]
    Y = (y0 - (np.arange(n_xy) - (n_xy - 1) / 2) * sxy).astype(np.float32)[None, :, None]
    Z = ((np.arange(nz) - (nz - 1) / 2) * sz).astype(np.float32)[None, None, :]
    shape = (n_xy, n_xy, nz)
    zt = Z / (zext / 2)                                   # -1 (inferior) .. +1 (superior)
    ax, ay = rng.uniform(140, 175), rng.uniform(95, 125)
    cx, cy = rng.uniform(-12, 12), rng.uniform(-15, 5)
    taper = 1 - 0.12 * np.clip(zt, 0, 1) ** 2  # the body: an elliptic cylinder, narrowing towards the neck
    rb = np.sqrt(((X - cx) / (ax * taper)) ** 2 + ((Y - cy) / (ay * taper)) ** 2)  # 1 at the skin
    fat_t, mus_t = rng.uniform(8, 25), rng.uniform(8, 14)  # mm
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[rb < 1] = -100                                                    # subcutaneous fat
    hu[rb < 1 - fat_t / ay] = 45                                         # muscle wall
    inner = rb < 1 - (fat_t + mus_t) / ay
    hu[inner] = 30                                                       # mediastinal soft tissue
    lax, lay, laz = ax * rng.uniform(0.36, 0.42), ay * rng.uniform(0.72, 0.82), zext * rng.uniform(0.36, 0.44)
    lcz = rng.uniform(-0.05, 0.12) * zext
    lung = np.zeros(shape, dtype=bool)  # lungs: ellipsoids either side of the mediastinum
    for side in (-1, 1):
        lcx = cx + side * ax * rng.uniform(0.40, 0.48)
        lung |= (((X - lcx) / lax) ** 2 + ((Y - cy + 0.05 * ay) / lay) ** 2 + ((Z - lcz) / laz) ** 2) < 1
    lung &= inner
    hcx, hcy, hcz = cx - 0.15 * ax, cy + 0.25 * ay, lcz - 0.25 * laz  # heart (patient's left = -x in RAS)
    heart = (((X - hcx) / rng.uniform(50, 62)) ** 2 + ((Y - hcy) / rng.uniform(40, 50)) ** 2
             + ((Z - hcz) / rng.uniform(45, 60)) ** 2) < 1
    aorta = (((X - cx + 22) ** 2 + (Y - cy + 0.45 * ay) ** 2) < 13 ** 2) & (Z > hcz)  # descending, by the spine
    lung &= ~heart & ~aorta
    # lung parenchyma: -860 HU with soft texture; emphysema = low-attenuation blobs covering a class-dependent fraction
    frac = [0.01, 0.06, 0.14, 0.25, 0.38][cls] * rng.uniform(0.8, 1.2)
    tex = _smooth_noise(rng, shape, (n_xy / 8, n_xy / 8, nz / 6))
    par = -860 + 25 * _smooth_noise(rng, shape, (n_xy / 4, n_xy / 4, nz / 3))
    low = tex < np.quantile(tex[lung], frac)
    par = np.where(low, -975 + 10 * _smooth_noise(rng, shape, (n_xy / 4, n_xy / 4, nz / 3)), par)
    vessels = _smooth_noise(rng, shape, (n_xy / 3, n_xy / 3, nz / 4)) > 2.0  # sparse bright dots: vessels
    par = np.where(vessels & ~low, -100.0, par)
    hu = np.where(lung, par, hu)
    hu[heart] = 40
    hu[aorta] = 45
    # spine: vertebral bodies (cancellous core, cortical rim) and discs every ~30 mm, a spinous process behind
    vy = cy - ay * 0.62  # posterior is -y in RAS
    rv = np.sqrt((X - cx) ** 2 + (Y - vy) ** 2)
    disc = np.mod(Z + rng.uniform(0, 30), 30) < 6
    hu = np.where((rv < 18) & ~disc, np.where(rv > 15, 600.0, 220.0), hu)
    hu = np.where((rv < 18) & disc, 80.0, hu)
    hu = np.where((np.abs(X - cx) < 5) & (Y < vy - 18) & (Y > vy - 45) & ~disc & (rb < 1 - fat_t / ay), 500.0, hu)
    # ribs: arcs inside the muscle wall every ~25 mm, sparing the front (sternum gap)
    ring = (rb > 1 - (fat_t + mus_t * 0.8) / ay) & (rb < 1 - (fat_t + mus_t * 0.2) / ay)
    ribs = ring & (np.mod(Z + rng.uniform(0, 25), 25) < 8) & (Y - cy < 0.6 * ay)
    hu = np.where(ribs, 650.0, hu)
    # scanner noise, and -1024 outside the reconstruction circle
    hu += rng.uniform(8, 16) * rng.standard_normal(size=shape, dtype=np.float32)
    hu[np.broadcast_to(np.sqrt((X - x0) ** 2 + (Y - y0) ** 2) > fov / 2, shape)] = -1024
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    affine = np.array([[-sxy, 0, 0, X[0, 0, 0]], [0, -sxy, 0, Y[0, 0, 0]], [0, 0, sz, Z[0, 0, 0]], [0, 0, 0, 1]])
    return hu, affine, dict(cls=int(cls), lung_volume_ml=float(lung.sum() * sxy * sxy * sz / 1000),
                            pct_below_950=float(100 * (hu[lung] < -950).mean()))


def make_demo(out, num=128, img_size=64, seed=1337, workers=1, log=print):
    """num phantoms (NIfTI + labels.csv) into out/raw, then prepared into out like real scans (prepare_dataset)."""
    size = parse_size(img_size)
    raw = os.path.join(out, "raw")
    os.makedirs(raw, exist_ok=True)
    lpath = os.path.join(raw, "labels.csv")
    n_xy = max(48, 3 * max(size[1:]) // 2)  # finer than stored, so preparing really downsamples (anti-aliased)
    t = time.time()
    ids = [f"phantom_{k:04d}" for k in range(num)]
    have = (all(os.path.exists(os.path.join(raw, v + ".nii.gz")) for v in ids) and os.path.exists(lpath)
            and [r["id"] for r in csv.DictReader(open(lpath, newline=""))] == ids)
    if not have:  # (re)generate; files already written by an interrupted run are kept
        nthreads = torch.get_num_threads()
        torch.set_num_threads(1)  # small volumes: one thread avoids the pool's hand-off cost
        rows = []
        for k, vid in enumerate(ids):
            fpath = os.path.join(raw, vid + ".nii.gz")
            hu, affine, lab = make_phantom(np.random.default_rng([seed, k]), k % 5, n_xy)  # balanced classes
            if not os.path.exists(fpath):
                img = nib.Nifti1Image(hu, affine)
                img.header.set_xyzt_units("mm")
                write_atomic(fpath, img.to_filename)  # a killed run leaves no half-written file
            rows.append({"id": vid, "class": lab["cls"], "lung_volume_ml": f"{lab['lung_volume_ml']:.1f}",
                         "pct_below_950": f"{lab['pct_below_950']:.2f}"})
        torch.set_num_threads(nthreads)
        with open(lpath + ".tmp", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "class", "lung_volume_ml", "pct_below_950"])
            w.writeheader()
            w.writerows(rows)
        os.replace(lpath + ".tmp", lpath)
    log(f"{raw}: {num} phantoms written in {time.time() - t:.1f}s")
    return prepare_dataset([raw], out, img_size=size, modality="ct", labels=lpath, workers=workers, log=log)


if __name__ == "__main__":
    override(config, ranges=RANGES)
    try:
        sys.exit(make_demo(config["out"], config["num"], config["img_size"], config["seed"], config["workers"]))
    except ValueError as e:
        fail(str(e))
