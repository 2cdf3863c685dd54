"""
Encode real scans into HA-GAN's latent Z (paper Sec. III-C, Inference: Z-hat = E^G(concat_v E^H(S^H(X; T_v))))
and use it: predict clinical measurements (Sec. IV-D, Table VI) and find latent directions (Sec. IV-E).

    python encode.py --data_dir=data/demo --out=features/                       # features.npy [N, latent_dim] + ids.csv
    python encode.py --data_dir=data/demo --out=features/ --recon=4             # + 4 reconstructions G(E(x)), L1 and PSNR
    python encode.py --data_dir=data/demo --out=features/ --regress=lung_volume_ml,pct_below_950
    python encode.py --data_dir=data/demo --out=features/ --direction=lung_volume_ml
    python sample.py --direction=features/direction_lung_volume_ml.npy --steps=7 --scale=3 --png
    python encode.py --input="scans/*.nii.gz" --out=features_new/           # NIfTI files, prepared on the fly

--regress: Ridge (lambda 1e-4, intercept unpenalised) of log(column) on Z, trained on four folds of the 5-fold
split and scored by R^2 on the fifth, for every fold. --direction: least squares column = w.Z + b on all volumes;
w is the direction. Files are written once everything is computed, each by a rename.
"""

import csv
import math
import os
import time

import numpy as np
import torch

from configurator import autocast, fail, override, pick_device
from model import load_checkpoint
from prepare import (NUM_FOLDS, VolumeDataset, find_inputs, input_ids, prepare_file, read_meta, safe_name,
                     writable_dir, write_atomic, write_json, write_volume)

# -----------------------------------------------------------------------------
config = dict(
    data_dir="data/demo",  # a folder written by prepare.py
    input=[],  # instead of data_dir: scans prepared on the fly, as prepare.py's --input (repeatable), ids alike
    first_volume=False,  # --input: 4D series: use the first volume (as prepare.py --first_volume)
    ckpt="out/ckpt.pt",  # checkpoint written by train.py
    meta="",  # --input: the meta.json whose settings prepare them; '' = the one kept in the checkpoint
    out="features",  # output folder
    split="all",  # prepared folder: 'all', or 'train' / 'val' of --fold
    fold=0,  # the fold of --split=train|val
    batch_size=1,  # volumes per forward
    device="auto",  # 'cpu', 'cuda', 'cuda:1'...; 'auto' = cuda if available
    dtype="float32",  # 'float32', 'bfloat16' or 'float16' autocast
    ema=True,  # reconstruct with the moving average of G's weights when the checkpoint has one
    recon=0,  # also write this many reconstructions G(E(x)) and their prepared originals, with L1/PSNR
    chunk=-1,  # --recon: G^H this many A-slices at a time (0 = all at once; -1 = all at once if it fits)
    regress="",  # comma-separated label columns: Ridge on Z, held-out R^2 per fold
    lam=1e-4,  # Ridge lambda (paper Sec. IV-D)
    log=True,  # --regress: predict log(column), as the paper does (Table VI)
    direction="",  # comma-separated label columns: least-squares latent direction -> OUT/direction_<col>.npy
    overwrite=False,  # replace existing output files
)
# the allowed values of the numeric keys (configurator's rules), checked before anything runs
RANGES = dict(fold=f"[-1,{NUM_FOLDS - 1}]", batch_size=">=1", recon=">=0", chunk=">=-1", lam=">=0")
# -----------------------------------------------------------------------------


def ridge(X, y, lam=1e-4):
    """(w, b) minimising ||y - X w - b||^2 + lam ||w||^2, the intercept unpenalised (sklearn's Ridge)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    mx, my = X.mean(0), y.mean()
    Xc, yc = X - mx, y - my
    n, p = Xc.shape
    if p <= n:
        w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(p), Xc.T @ yc)
    else:  # fewer volumes than latent dims: the same w from the n x n dual system X^T (X X^T + lam I)^-1 y
        w = Xc.T @ np.linalg.solve(Xc @ Xc.T + lam * np.eye(n), yc)
    return w, my - mx @ w


def r2(y, yhat):
    """Coefficient of determination 1 - SS_res / SS_tot around the held-out mean (sklearn's r2_score)."""
    y, yhat = np.asarray(y, dtype=np.float64), np.asarray(yhat, dtype=np.float64)
    ss = ((y - y.mean()) ** 2).sum()
    return 1.0 - ((y - yhat) ** 2).sum() / ss if ss > 0 else float("nan")


def cross_validate(Z, y, folds, lam=1e-4, log=True):
    """Held-out R^2 of Ridge for each fold f (train on the other folds). Rows with missing y are dropped."""
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y)
    if log:
        if np.any(y[ok] <= 0):
            raise ValueError("has values <= 0, so log() is undefined; use --log=False")
        y = np.where(ok, np.log(np.where(ok, y, 1.0)), np.nan)
    res = {}
    for f in sorted(set(folds[ok].tolist())):
        tr, te = ok & (folds != f), ok & (folds == f)
        if tr.sum() < 2 or te.sum() < 2:
            continue
        w, b = ridge(Z[tr], y[tr], lam)
        res[int(f)] = r2(y[te], Z[te] @ w + b)
    return res


def direction(Z, y):
    """Least-squares linear model y = w.Z + b on all rows with a value (paper Sec. IV-E): (w, b, in-sample R^2).
    With fewer volumes than latent dims this is the minimum-norm solution."""
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y)
    X = np.asarray(Z, dtype=np.float64)[ok]
    mx, my = X.mean(0), y[ok].mean()
    w = np.linalg.lstsq(X - mx, y[ok] - my, rcond=None)[0]
    b = my - mx @ w
    return w, b, r2(y[ok], X @ w + b)


class _Files:
    """NIfTI (or any prepare.py input) files seen like a VolumeDataset: prepared on the fly with a meta."""

    def __init__(self, found, meta):
        self.paths, self.meta, self.img_size = [p for p, _ in found], meta, tuple(meta["img_size"])
        self.ids, self.labels, self.folds = input_ids([n for _, n in found]), {}, None

    def __len__(self):
        return len(self.paths)

    def volume(self, j):
        return prepare_file(self.paths[j], self.meta)[0]


def open_data(c, ckpt_meta):
    """The prepared folder (VolumeDataset), or --input's files prepared on the fly (_Files, without folds)."""
    data = c["data_dir"]
    if not c["input"]:
        try:
            ds = VolumeDataset(data, c["split"], c["fold"])
        except (FileNotFoundError, ValueError, AssertionError, KeyError) as e:
            fail(str(e) if str(e).startswith(data) else f"{data}: {e}")
        return ds
    found, missing = find_inputs(c["input"])
    if missing:
        fail(f"{missing[0][0]}: {missing[0][1]}")
    if not found:
        fail(f"{', '.join(c['input'])}: no image files there")
    try:
        meta = read_meta(c["meta"]) if c["meta"] else ckpt_meta
    except ValueError as e:
        fail(str(e))
    if not meta or "img_size" not in meta:
        fail("to prepare NIfTI files we need the dataset's meta.json: the checkpoint has none, pass --meta")
    if c["first_volume"]:
        meta = dict(meta, settings=dict(meta.get("settings", {}), first_volume=True))
    return _Files(found, meta)


def encode_all(c, model, ds, source):
    """Z [N, latent_dim] of every volume, and (id, original, G(E(x)), L1, PSNR) of the first --recon."""
    N = len(ds)
    classes = ds.labels.get(ds.meta.get("class_column") or "")
    Z = np.zeros((N, model.cfg.latent_dim), dtype=np.float32)
    recons, t0 = [], time.time()
    for i in range(0, N, c["batch_size"]):
        js = range(i, min(i + c["batch_size"], N))
        try:
            xs = [ds.volume(j) for j in js]
        except ValueError as e:  # a NIfTI input that cannot be read or prepared
            fail(str(e))
        except OSError as e:  # the store (or a scan) went away while we were reading it
            fail(f"{e.filename or source}: cannot read it any more ({e.strerror or e}); nothing written")
        x = torch.from_numpy(np.stack(xs))[:, None].to(c["device"])  # (B,1,D,H,W) in [-1, 1]
        with torch.no_grad(), autocast(c["device"], c["dtype"]):
            z = model.encode(x).float()  # (B, latent_dim)
            Z[i:i + len(js)] = z.cpu().numpy()
            k = [j for j in js if j < c["recon"]]
            if k:
                cl = None
                if model.cfg.num_classes:
                    cl = torch.tensor([int(classes[j]) if classes is not None else 0 for j in k], device=c["device"])
                xr = model.generate(z[:len(k)], cl, chunk=c["chunk"]).float()  # (b,1,D,H,W)
                for j, a, b in zip(k, x[:len(k)].float().cpu().numpy(), xr.cpu().numpy()):
                    a, b = a[0], b[0]
                    psnr = 10 * math.log10(4.0 / max(float(((a - b) ** 2).mean()), 1e-12))  # peak-to-peak 2
                    recons.append((ds.ids[j], a, b, float(np.abs(a - b).mean()), psnr))
        if (i // c["batch_size"]) % 20 == 0 or i + len(js) == N:
            print(f"encoded {i + len(js)}/{N} ({(time.time() - t0) / (i + len(js)):.2f} s/volume)")
    if not np.all(np.isfinite(Z)):
        fail("the encoder produced non-finite features (a broken checkpoint?); nothing written")
    return Z, recons


def write_all(c, ds, Z, recons, results, dirs, t0):
    """Every output file, each by a rename; a full disk is one line, and nothing is left half-written."""
    out, meta, folds = c["out"], ds.meta, ds.folds
    try:
        os.makedirs(out, exist_ok=True)
        write_atomic(os.path.join(out, "features.npy"), lambda p: np.save(p, Z))
        cols = list(ds.labels)

        def write_ids(p):
            with open(p, "w", newline="") as f:
                wr = csv.writer(f)
                wr.writerow(["row", "id"] + cols + (["fold"] if folds is not None else []))
                for j, i in enumerate(ds.ids):
                    wr.writerow([j, i] + [ds.labels[k][j] for k in cols] + ([folds[j]] if folds is not None else []))
        write_atomic(os.path.join(out, "ids.csv"), write_ids)
        print(f"{out}/features.npy {tuple(Z.shape)} and ids.csv ({time.time() - t0:.1f}s)")
        for vid, a, b, l1, psnr in recons:
            for kind, v, what in (("orig", a, "prepared"), ("recon", b, "G(E(x))")):
                write_volume(os.path.join(out, f"{safe_name(vid)}_{kind}.nii.gz"), v, meta, f"{what} {vid}")
            hu = f" ({l1 * (meta['window'][1] - meta['window'][0]) / 2:.1f} HU)" if meta.get("window") else ""
            print(f"recon {vid}: L1 {l1:.4f}{hu}, PSNR {psnr:.2f} dB")
        if recons:
            print(f"recon mean over {len(recons)}: L1 {np.mean([r[3] for r in recons]):.4f}, "
                  f"PSNR {np.mean([r[4] for r in recons]):.2f} dB")
        for col, r in results.items():
            folds_s = " ".join(f"{v:.3f}" for v in r["r2_per_fold"].values())
            print(f"Ridge {r['target']}: held-out R^2 {r['r2_mean']:.3f} +- {r['r2_std']:.3f} "
                  f"(folds: {folds_s}; n={r['n']})")
        if results:
            write_json(os.path.join(out, "regress.json"), results)
        for col, (w, info) in dirs.items():
            base = os.path.join(out, f"direction_{safe_name(col)}")
            write_atomic(base + ".npy", lambda p: np.save(p, w.astype(np.float32)))
            write_json(base + ".json", info)
            print(f"{base}.npy: |w| = {info['norm']:.4g} {col} per unit of z (in-sample R^2 {info['r2_fit']:.3f})")
    except OSError as e:  # write_atomic's: e.filename is the file being written
        fail(f"{e.filename or out}: cannot write it ({e.strerror or e}); the files written before it are complete, "
             f"and nothing half-written is left")


def main(argv=None):
    given = set()
    c = override(dict(config), argv, given, RANGES)
    if c["dtype"] not in ("float32", "bfloat16", "float16"):
        fail(f"--dtype={c['dtype']}: use float32, bfloat16 or float16")
    if c["input"] and "data_dir" in given:
        fail(f"--data_dir={c['data_dir']} and --input={c['input'][0]}: give one, a prepared store or scans")
    try:
        c["device"] = pick_device(c["device"])
        writable_dir(c["out"])  # an unwritable folder fails here, before the model is loaded
        model, ckpt = load_checkpoint(c["ckpt"], c["device"], ema=c["ema"])
    except ValueError as e:
        fail(str(e).strip().splitlines()[0])
    ds = open_data(c, ckpt.get("meta") or {})
    source = ", ".join(c["input"]) or c["data_dir"]
    if tuple(ds.img_size) != tuple(model.cfg.shape):
        fail(f"{source}: volumes are {'x'.join(map(str, ds.img_size))} but the model takes "
             f"{'x'.join(map(str, model.cfg.shape))}")
    # every requested column must exist, and no file be in the way, before we spend time encoding
    reg = [s for s in c["regress"].split(",") if s]
    dirs = [s for s in c["direction"].split(",") if s]
    have = [k for k in ds.labels if k != ds.meta.get("class_column")]
    for col in reg + dirs:
        if col not in ds.labels:
            fail(f"unknown label column '{col}'; {source} has {', '.join(have) or 'no labels'}")
    if reg and ds.folds is None:
        fail("--regress needs a prepared folder (its labels and folds)")
    for col in reg:  # the values and the folds, checked as cross_validate will, on stand-in features
        try:
            if not cross_validate(np.zeros((len(ds), 1)), ds.labels[col], ds.folds, c["lam"], c["log"]):
                fail(f"--regress={col}: too few labelled volumes for 5-fold cross-validation")
        except ValueError as e:
            fail(f"--regress={col}: {e}")
    # file names from ids and label columns: whatever they hold, the files stay inside OUT (safe_name)
    files = ["features.npy", "ids.csv"] + (["regress.json"] if reg else [])
    files += [f"direction_{safe_name(col)}{e}" for col in dirs for e in (".npy", ".json")]
    files += [f"{safe_name(i)}_{kind}.nii.gz" for i in ds.ids[:c["recon"]] for kind in ("orig", "recon")]
    taken = [f for f in files if os.path.exists(os.path.join(c["out"], f))]
    if taken and not c["overwrite"]:
        fail(f"{os.path.join(c['out'], taken[0])} exists; pass --overwrite or another --out")
    t0 = time.time()
    Z, recons = encode_all(c, model, ds, source)
    # the analyses, all before anything is written
    results = {}
    for col in reg:
        res = cross_validate(Z, ds.labels[col], ds.folds, c["lam"], c["log"])
        v = np.array(list(res.values()))
        results[col] = dict(target=f"log({col})" if c["log"] else col, lam=c["lam"], r2_per_fold=res,
                            r2_mean=float(v.mean()), r2_std=float(v.std()), n=int(np.isfinite(ds.labels[col]).sum()))
    dir_out = {}
    for col in dirs:
        w, b, fit = direction(Z, ds.labels[col])
        dir_out[col] = (w, dict(column=col, intercept=float(b), norm=float(np.linalg.norm(w)), r2_fit=float(fit),
                                latent_dim=int(w.size), ckpt=os.path.abspath(c["ckpt"]),
                                note=f"{col} ~ w.z + b; one unit of z along w/|w| changes it by |w|"))
    write_all(c, ds, Z, recons, results, dir_out, t0)


if __name__ == "__main__":
    main()
