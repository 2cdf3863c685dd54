"""
Generate whole volumes with a trained HA-GAN (paper Fig. 2: G^A then G^H on all of A), as NIfTI files
a viewer opens right side up: CT in int16 Hounsfield units, MRI in float32, with the dataset's affine.

    python sample.py --out samples/                                    # 8 volumes, seeds 1337..1344, from out/ckpt.pt
    python sample.py --ckpt=out/ckpt.pt --num=100 --seed=0 --batch_size=4 --png
    python sample.py --label=3 --num=20                                # class-conditional model: class 3 only
    python sample.py --chunk=8                                         # G^H 8 A-slices at a time: same volumes, less memory
    python sample.py --help                                            # every key, its default and meaning
    python sample.py --official=HA_GAN_run1/G_iter80000.pth --out=official/ --format=npy
    python sample.py --interp=8 --seed=1 --seed2=2 --png               # 8 steps on the great circle z(1) -> z(2)
    python sample.py --direction=features/direction_lung_volume_ml.npy --steps=7 --scale=3 --png

Volume i's z comes from seed+i, whatever --batch_size: OUT/seed001337.nii.gz, a .json sidecar (checkpoint,
iteration, seed, class), with --png its mid-planes. A series: OUT/interp_1_2_00.nii.gz ... or
OUT/<direction>_s1337_00.nii.gz ..., and one .png. Nothing is overwritten without --overwrite. G^H renders the
whole volume at once when it fits in the free memory, else in chunks (it says so): the same volumes either way.
"""

import json
import os
import re
import resource
import time

import nibabel as nib
import numpy as np
import torch

from configurator import autocast, fail, override, pick_device
from model import HAGAN, auto_chunk, free_memory, load_checkpoint
from prepare import output_affine, read_meta, safe_name, save_montage, writable_dir, write_json, write_volume

# -----------------------------------------------------------------------------
config = dict(
    ckpt="out/ckpt.pt",  # checkpoint written by train.py
    official="",  # an official batmanlab/HA-GAN G_iterN.pth to sample from instead of --ckpt
    official_size=256,  # the official 128^3 and 256^3 generators share weights; this picks the upsampling
    meta="",  # a dataset meta.json for intensities and geometry; '' = the one kept in the checkpoint
    out="samples",  # output folder
    num=8,  # number of volumes (ignored by --interp / --direction, which write one series)
    seed=1337,  # volume i is drawn from seed + i
    seed2=-1,  # --interp: the end point's seed; -1 = seed + 1
    batch_size=1,  # volumes per forward; does not change the output
    label=-1,  # conditional model: class of every volume; -1 = classes in turn (volume i gets i % K)
    chunk=-1,  # > 0: run G^H this many A-slices at a time (exact, bounded memory); 0 = all at once; -1 = 0 if it fits
    device="auto",  # 'cpu', 'cuda', 'cuda:1'...; 'auto' = cuda if available
    threads=0,  # CPU threads (torch.set_num_threads); 0 = torch's default
    dtype="float32",  # 'float32', 'bfloat16' or 'float16' autocast (G's last conv and tanh stay float32)
    ema=True,  # use the moving average of G's weights when the checkpoint has one
    format="nii.gz",  # 'nii.gz', 'nii' or 'npy' (npy: the same intensities, no geometry)
    png=False,  # also write the three mid-planes of each volume as a PNG
    overwrite=False,  # replace existing files
    interp=0,  # > 0: write this many volumes interpolating (slerp) from z(seed) to z(seed2)
    direction="",  # a latent direction .npy (encode.py --direction): traverse it from z(seed)
    steps=7,  # --direction: number of volumes in the traversal
    scale=3.0,  # --direction: go from -scale to +scale standard deviations of z along the direction
)
RANGES = dict(num=">=1", seed=">=0", seed2=">=-1", batch_size=">=1", label=">=-1", chunk=">=-1", threads=">=0",
              interp=">=0", steps=">=1", scale=">0")  # configurator's rules, checked before anything runs
# -----------------------------------------------------------------------------

# the official code's data (COPDGene CT, paper Sec. IV-A); it keeps no geometry, so 1 mm voxels are a guess (--meta)
OFFICIAL_META = dict(modality="ct", window=[-1024.0, 600.0], spacing=[1.0, 1.0, 1.0], orientation="SPL")
MONTAGE_ROWS = 16  # a series' PNG shows at most this many of its volumes, evenly spaced


def seed_z(seed, latent_dim):
    """z ~ N(0, I) for one seed, drawn on the CPU so that it is the same on every device and batch."""
    return torch.randn(latent_dim, generator=torch.Generator().manual_seed(int(seed)))


def slerp(z0, z1, t):
    # spherical interpolation: a straight line between two N(0, I) samples passes through points of
    # norm ~0.7 sqrt(d) that the generator never saw in training; the great circle keeps the norm
    a, b = z0 / z0.norm(), z1 / z1.norm()
    omega = torch.arccos((a * b).sum().clamp(-1, 1))
    if omega < 1e-6:
        return (1 - t) * z0 + t * z1
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


def load_direction(path, latent_dim):
    """A direction .npy ([latent_dim] coefficients w of a linear model value = w.z + b) -> (w, its sidecar)."""
    try:
        w = np.load(path, allow_pickle=False)
    except Exception as e:
        fail(f"{path}: cannot read the direction ({type(e).__name__}: {e})")
    w = np.asarray(w, dtype=np.float64).reshape(-1) if w.size == latent_dim else None
    if w is None or not np.all(np.isfinite(w)) or np.linalg.norm(w) == 0:
        fail(f"{path}: need a nonzero finite vector of {latent_dim} numbers (this model's latent_dim)")
    side = os.path.splitext(path)[0] + ".json"  # encode.py's: the column and the intercept
    try:
        return w, (json.load(open(side)) if os.path.isfile(side) else {})
    except (OSError, ValueError) as e:
        fail(f"{side}: cannot read the direction's sidecar ({e})")


def load_model(c):
    """(model, meta, description of the weights) for the config c; one-line SystemExit on failure."""
    try:
        if c["official"]:
            model = HAGAN.from_official(G=c["official"], img_size=c["official_size"]).to(c["device"]).eval()
            meta, src = dict(OFFICIAL_META), dict(official=os.path.abspath(c["official"]))
        else:
            model, ckpt = load_checkpoint(c["ckpt"], c["device"], ema=c["ema"])
            meta = ckpt.get("meta") or {}
            src = dict(ckpt=os.path.abspath(c["ckpt"]), iter_num=ckpt.get("iter_num"),
                       ema=bool(c["ema"] and ckpt.get("ema_G")))
        meta = read_meta(c["meta"]) if c["meta"] else meta
    except (ValueError, OSError) as e:
        fail(str(e).strip().splitlines()[0])
    if not meta:
        print("warning: the checkpoint has no dataset meta; writing [-1, 1] float32 with 1 mm voxels (pass --meta)")
        meta = dict(modality="mri", window=None)
    return model, meta, src


def plan(c, model):
    """(n, item, series name) of what this run writes: item(i) -> (file stem, z, class, extra sidecar fields),
    computed when volume i is generated, so that any --num streams in constant memory."""
    K, d = model.cfg.num_classes, model.cfg.latent_dim
    if c["label"] >= 0 and not K:
        fail(f"--label={c['label']}: this model is unconditional (trained without classes)")
    if c["label"] >= K > 0:
        fail(f"--label={c['label']}: unknown label, this model has classes 0..{K - 1}")
    cls = (lambda i: c["label"] if c["label"] >= 0 else i % K) if K else (lambda i: None)
    if c["interp"] and c["direction"]:
        fail("--interp and --direction each write a series; use one at a time")
    if c["interp"]:
        s0, s1, n = c["seed"], (c["seed2"] if c["seed2"] >= 0 else c["seed"] + 1), c["interp"]
        z0, z1 = seed_z(s0, d), seed_z(s1, d)
        name = f"interp_{s0}_{s1}"

        def item(k):
            t = k / (n - 1) if n > 1 else 0.0
            return f"{name}_{k:02d}", slerp(z0, z1, t), cls(0), dict(seed=s0, seed2=s1, t=t)
        return n, item, name
    if c["direction"]:
        w, info = load_direction(c["direction"], d)
        u, z0, n = torch.from_numpy(w / np.linalg.norm(w)).float(), seed_z(c["seed"], d), c["steps"]
        name = f"{safe_name(os.path.splitext(os.path.basename(c['direction']))[0])}_s{c['seed']}"

        def item(k):
            t = c["scale"] * (2 * k / (n - 1) - 1) if n > 1 else 0.0
            z = z0 + t * u
            extra = dict(seed=c["seed"], direction=os.path.abspath(c["direction"]), t=t)
            if "intercept" in info:  # the linear model's prediction, to see how far the traversal goes
                extra["predicted"] = {info.get("column", "value"): float(info["intercept"] + w @ z.double().numpy())}
            return f"{name}_{k:02d}", z, cls(0), extra
        return n, item, name
    return c["num"], lambda i: (f"seed{c['seed'] + i:06d}", seed_z(c["seed"] + i, d), cls(i),
                                dict(seed=c["seed"] + i)), ""


def write_all(c, model, meta, src, n, item, series):
    """Generate the n volumes, batch by batch, and write each with its sidecar (and PNGs) as it comes."""
    out, ext = c["out"], "." + c["format"]
    # a series' montage: at most MONTAGE_ROWS of its volumes, at half resolution
    shown = {round(j * (n - 1) / (MONTAGE_ROWS - 1)) for j in range(MONTAGE_ROWS)} if n > MONTAGE_ROWS else range(n)
    previews, written = [], 0
    try:  # a full disk: one line; write_atomic leaves no temp file, and the volumes written so far are whole
        os.makedirs(out, exist_ok=True)
        for i in range(0, n, c["batch_size"]):
            batch = [item(j) for j in range(i, min(i + c["batch_size"], n))]
            z = torch.stack([it[1] for it in batch]).to(c["device"])  # (B, latent_dim)
            cl = None if batch[0][2] is None else torch.tensor([it[2] for it in batch], device=c["device"])
            t = time.time()
            with torch.no_grad(), autocast(c["device"], c["dtype"]):
                x = model.generate(z, cl, chunk=c["chunk"])  # (B,1,D,H,W) in [-1, 1]
            x = x.float().cpu().numpy()[:, 0]  # (B,D,H,W)
            dt = time.time() - t
            for j, (name, _, k, extra), v in zip(range(i, n), batch, x):
                side = dict(src, seed=extra.pop("seed"), **({} if k is None else {"class": k}), **extra,
                            chunk=c["chunk"], dtype=c["dtype"], shape=list(v.shape))
                write_volume(os.path.join(out, name + ext), v, meta, f"HA-GAN {name}")
                write_json(os.path.join(out, name + ".json"), side)
                if c["png"] and not series:  # mid-planes as prepare.py's stored orientation (S,P,L) shows them
                    save_montage(os.path.join(out, name + ".png"), [v])
                if c["png"] and series and j in shown:
                    previews.append(v[::2, ::2, ::2].copy())  # half resolution keeps a long series' montage small
                written += 1
                pred = " ".join(f"{k2}={v2:.4g}" for k2, v2 in extra.get("predicted", {}).items())
                print(f"{name}{ext}" + ("" if k is None else f" class {k}")
                      + (f" t={extra['t']:.3g}" if "t" in extra else "") + (f" predicted {pred}" if pred else ""))
            print(f"  {dt / len(batch):.2f} s/volume")
        if previews:
            save_montage(os.path.join(out, series + ".png"), previews)
    except OSError as e:  # write_atomic's: e.filename is the file being written
        fail(f"{e.filename or out}: cannot write it ({e.strerror or e}); the {written} volume(s) before it are complete, "
             f"and nothing half-written is left")


def main(argv=None):
    c = override(dict(config), argv, ranges=RANGES)
    if c["format"] not in ("nii.gz", "nii", "npy"):
        fail(f"--format={c['format']}: use nii.gz, nii or npy")
    if c["dtype"] not in ("float32", "bfloat16", "float16"):
        fail(f"--dtype={c['dtype']}: use float32, bfloat16 or float16")
    if c["threads"]:
        torch.set_num_threads(c["threads"])
    try:
        c["device"] = pick_device(c["device"])
        writable_dir(c["out"])  # an unwritable folder fails here, before the model is loaded
    except ValueError as e:
        fail(str(e))
    model, meta, src = load_model(c)
    n, item, series = plan(c, model)
    # what would be overwritten, from one listing of the folder: no check per volume, so any --num is fine
    mine = ["." + c["format"], ".json"] + ([".png"] if c["png"] and not series else [])
    pattern = re.compile((re.escape(series) + "_" if series else "seed") + r"(\d+)("
                         + "|".join(map(re.escape, mine)) + ")")
    taken = []
    for f in sorted(os.listdir(c["out"]) if os.path.isdir(c["out"]) else []):
        m = pattern.fullmatch(f)
        i = int(m.group(1)) - (0 if series else c["seed"]) if m else -1
        if (m and 0 <= i < n and item(i)[0] + m.group(2) == f) or (c["png"] and series and f == series + ".png"):
            taken.append(f)
    if taken and not c["overwrite"]:
        fail(f"{os.path.join(c['out'], taken[0])} exists ({len(taken)} of the output files do); pass --overwrite or "
             f"another --out")
    if c["chunk"] < 0:  # the whole volume at once where it fits, else the largest chunk that does
        free = free_memory(c["device"])
        c["chunk"] = auto_chunk(model.cfg, c["batch_size"], 4, free)
        if c["chunk"]:
            print(f"chunk {c['chunk']}: the whole-volume render of {c['batch_size']} volume(s) would not fit in the "
                  f"{free / 2**30:.1f} GiB free on {c['device']} (or passes 2^31 elements); --chunk=0 forces it")
    affine = output_affine(meta, model.cfg.shape)
    units = "int16 HU" if meta.get("modality") == "ct" and meta.get("window") else "float32"
    print(f"{n} volume(s) {'x'.join(map(str, model.cfg.shape))} -> {c['out']}/ ({meta.get('modality', '?')}, {units}"
          f", orientation {''.join(nib.aff2axcodes(affine))}), device {c['device']}, {c['dtype']}"
          + (f", chunk {c['chunk']}" if c["chunk"] else ""))
    t0 = time.time()
    write_all(c, model, meta, src, n, item, series)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux -> GiB
    print(f"done: {n} volume(s) in {time.time() - t0:.1f}s, peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
