"""
Generate whole volumes with a trained HA-GAN (paper Fig. 2: G^A then G^H on all of A), as NIfTI files
a viewer opens right side up: CT in int16 Hounsfield units, MRI in float32, with the dataset's affine.
Also the writers of every output file (NIfTI, PNG montage, atomic rename) that train.py and encode.py use.

    python sample.py --out samples/                                    # 8 volumes, seeds 1337..1344, from out/ckpt.pt
    python sample.py --ckpt=out/ckpt.pt --num=100 --seed=0 --batch_size=4 --png
    python sample.py --label=3 --num=20                                # class-conditional model: class 3 only
    python sample.py --chunk=8                                         # G^H 8 A-slices at a time: same volumes, less memory
    python sample.py --official=HA_GAN_run1/G_iter80000.pth --out=official/ --format=npy
    python sample.py --interp=8 --seed=1 --seed2=2 --png               # 8 steps on the great circle z(1) -> z(2)
    python sample.py --direction=features/direction_lung_volume_ml.npy --steps=7 --scale=3 --png

Volume i gets its own z from seed+i, so the files do not depend on --batch_size. Files: OUT/seed001337.nii.gz
(+ .json sidecar: checkpoint, iteration, seed, class; + .png with --png: axial, coronal and sagittal
mid-planes). Series: OUT/interp_1_2_00.nii.gz ..., OUT/<direction>_s1337_00.nii.gz ..., and one .png montage.
Existing files are never overwritten without --overwrite.
"""

import json
import os
import re
import resource
import struct
import time
import zlib

import nibabel as nib
import numpy as np
import torch

from model import HAGAN, autocast_ctx, fail, load_checkpoint, override, pick_device
from prepare import from_unit, read_meta, writable_dir

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
    chunk=0,  # > 0: run G^H this many A-slices at a time (exact, bounded memory; model.py); 0 = all at once
    device="auto",  # 'cpu', 'cuda', 'cuda:1'...; 'auto' = cuda if available
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
# -----------------------------------------------------------------------------

# what the official code trained on (COPDGene thorax CT, paper Sec. IV-A); its preprocessing keeps no
# geometry, so 1 mm voxels in our stored orientation is a guess: pass --meta to say otherwise
OFFICIAL_META = dict(modality="ct", window=[-1024.0, 600.0], spacing=[1.0, 1.0, 1.0], orientation="SPL")


MONTAGE_ROWS = 16  # a series' PNG shows at most this many of its volumes, evenly spaced


# -----------------------------------------------------------------------------
# intensities and geometry of the output files


def output_affine(meta, shape):
    """4x4 voxel -> RAS mm of a generated (D,H,W) volume: the dataset's affine (stored grid -> world)
    when the shapes agree, else its axes rescaled to the new grid about the same centre."""
    if meta.get("affine") is not None:
        A = np.array(meta["affine"], dtype=np.float64)
        src = tuple(meta.get("img_size") or shape)
    else:  # no affine recorded: axes from the orientation codes and the spacing, centred on 0
        codes = meta.get("orientation") or "SPL"
        sp = meta.get("spacing") or [1.0, 1.0, 1.0]
        A = np.eye(4)
        A[:3, :3] = 0
        for i, code in enumerate(codes):  # stored axis i runs towards `code` in RAS+ world space
            row, sign = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}[code]
            A[row, i] = sign * float(sp[i])
        A[:3, 3] = -A[:3, :3] @ ((np.array(shape) - 1) / 2)
        src = shape
    scale = np.array(src, dtype=np.float64) / np.array(shape)
    centre = A @ np.append((np.array(src) - 1) / 2, 1)  # world position of the grid centre
    A[:3, :3] = A[:3, :3] * scale
    A[:3, 3] = centre[:3] - A[:3, :3] @ ((np.array(shape) - 1) / 2)
    return A


def to_output(x, meta):
    """[-1, 1] float volume -> the modality's units: CT int16 HU through the inverse of the prepare
    window; MRI float32 in window units, or in [-1, 1] when the window was per volume (meta null)."""
    win = meta.get("window")
    if win is None:
        return np.asarray(x, dtype=np.float32)
    v = from_unit(np.asarray(x, dtype=np.float64), win)
    if meta.get("modality", "ct") == "ct":
        return np.clip(np.rint(v), -32768, 32767).astype(np.int16)
    return v.astype(np.float32)


def safe_name(s):
    """A file name from an id or a column name, whatever it holds: no folders, no leading dot, printable."""
    s = re.sub(r"[^A-Za-z0-9._+=-]", "_", str(s)).lstrip(".")
    return s or "_"


def write_atomic(path, write):
    """write(tmp) then rename, so an interrupted run never leaves a half-written file under `path`."""
    base = os.path.basename(path)
    ext = next((e for e in (".nii.gz", ".nii", ".npy", ".json", ".png", ".csv") if base.endswith(e)), "")
    tmp = os.path.join(os.path.dirname(path), f".{base[:len(base) - len(ext)]}.tmp{os.getpid()}{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_volume(path, x, meta, descrip=""):
    """One volume x (D,H,W) in [-1, 1] -> path (.nii.gz, .nii or .npy) in the modality's units."""
    data = to_output(x, meta)
    if path.endswith(".npy"):
        write_atomic(path, lambda p: np.save(p, data))
        return
    A = output_affine(meta, data.shape)
    img = nib.Nifti1Image(data, A)
    img.set_qform(A, code=1)  # 1 = scanner anatomical: both transforms say the same, for every viewer
    img.set_sform(A, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if meta.get("window") is not None:  # the display window viewers open with
        img.header["cal_min"], img.header["cal_max"] = meta["window"]
    else:
        img.header["cal_min"], img.header["cal_max"] = -1.0, 1.0
        descrip = (descrip + " units [-1,1]").strip()
    img.header["descrip"] = descrip[:79].encode()
    write_atomic(path, lambda p: nib.save(img, p))


def save_montage(path, vols):
    """
    PNG of three mid-planes per volume, one row each: axial (anterior up, patient's left on the right,
    as radiologists view it), coronal and sagittal (superior up). vols: [D,H,W] arrays in [-1,1] in
    prepare.py's stored orientation. A tiny PNG writer, so we need no imaging package.
    """
    rows = []
    for v in vols:
        v = np.asarray(v, dtype=np.float32)
        D, H, W = v.shape
        panels = [v[D // 2], v[::-1, H // 2, :], v[::-1, :, W // 2]]  # (H,W), (D,W), (D,H)
        h = max(p.shape[0] for p in panels)
        panels = [np.pad(p, ((0, h - p.shape[0]), (0, 2)), constant_values=-1) for p in panels]
        rows.append(np.concatenate(panels, 1))
    w = max(r.shape[1] for r in rows)
    img = np.concatenate([np.pad(r, ((0, 2), (0, w - r.shape[1])), constant_values=-1) for r in rows], 0)
    k = max(1, 128 // rows[0].shape[0])  # small volumes (S=32) enlarged to ~128 px per row
    img = np.repeat(np.repeat(img, k, 0), k, 1)
    img = np.clip((np.nan_to_num(img, nan=-1.0) + 1) * 127.5, 0, 255).astype(np.uint8)

    def png_chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xffffffff)
    raw = b"".join(b"\x00" + line.tobytes() for line in img)  # filter type 0 per scanline
    png = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", img.shape[1], img.shape[0], 8, 0, 0, 0, 0))
           + png_chunk(b"IDAT", zlib.compress(raw, 6)) + png_chunk(b"IEND", b""))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda p: open(p, "wb").write(png))


# -----------------------------------------------------------------------------
# latents


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
    """A direction .npy ([latent_dim] coefficients w of a linear model value = w.z + b) -> (w, sidecar)."""
    try:
        w = np.load(path, allow_pickle=False)
    except Exception as e:
        fail(f"{path}: cannot read the direction ({type(e).__name__}: {e})")
    w = np.asarray(w, dtype=np.float64).reshape(-1) if w.size == latent_dim else None
    if w is None or not np.all(np.isfinite(w)) or np.linalg.norm(w) == 0:
        fail(f"{path}: need a nonzero finite vector of {latent_dim} numbers (this model's latent_dim)")
    side = os.path.splitext(path)[0] + ".json"
    info = {}
    if os.path.isfile(side):
        try:
            with open(side) as f:
                info = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"{side}: cannot read the direction's sidecar ({e})")
    return w, info


# -----------------------------------------------------------------------------


def load_model(c):
    """(model, meta, description of the weights) for the config c; one-line SystemExit on failure."""
    device = c["device"]
    try:
        if c["official"]:
            model = HAGAN.from_official(G=c["official"], img_size=c["official_size"]).to(device).eval()
            meta, src = dict(OFFICIAL_META), dict(official=os.path.abspath(c["official"]))
        else:
            model, ckpt = load_checkpoint(c["ckpt"], device, ema=c["ema"])
            meta = ckpt.get("meta") or {}
            src = dict(ckpt=os.path.abspath(c["ckpt"]), iter_num=ckpt.get("iter_num"),
                       ema=bool(c["ema"] and ckpt.get("ema_G")))
    except (ValueError, OSError) as e:
        fail(str(e).strip().splitlines()[0])
    if c["meta"]:
        try:
            meta = read_meta(c["meta"])
        except ValueError as e:
            fail(str(e))
    if not meta:
        print("warning: the checkpoint has no dataset meta; writing [-1, 1] float32 with 1 mm voxels (pass --meta)")
        meta = dict(modality="mri", window=None)
    return model, meta, src


def plan(c, model):
    """(n, item, series name) of what this run writes: item(i) -> (file stem, z, class, extra sidecar fields),
    computed when volume i is generated, so that any --num streams in constant memory."""
    cfg = model.cfg
    K = cfg.num_classes
    if c["label"] >= 0 and not K:
        fail(f"--label={c['label']}: this model is unconditional (trained without classes)")
    if c["label"] >= K > 0:
        fail(f"--label={c['label']}: unknown label, this model has classes 0..{K - 1}")
    cls = (lambda i: c["label"] if c["label"] >= 0 else i % K) if K else (lambda i: None)
    d = cfg.latent_dim
    if c["interp"] and c["direction"]:
        fail("--interp and --direction each write a series; use one at a time")
    if c["interp"]:
        s0, s1 = c["seed"], (c["seed2"] if c["seed2"] >= 0 else c["seed"] + 1)
        z0, z1 = seed_z(s0, d), seed_z(s1, d)
        n = c["interp"]
        name = f"interp_{s0}_{s1}"

        def item(k):
            t = k / (n - 1) if n > 1 else 0.0
            return f"{name}_{k:02d}", slerp(z0, z1, t), cls(0), dict(seed=s0, seed2=s1, t=t)
        return n, item, name
    if c["direction"]:
        w, info = load_direction(c["direction"], d)
        u = torch.from_numpy(w / np.linalg.norm(w)).float()
        z0 = seed_z(c["seed"], d)
        n = c["steps"]
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


def main(argv=None):
    c = override(dict(config), argv)
    if c["format"] not in ("nii.gz", "nii", "npy"):
        fail(f"--format={c['format']}: use nii.gz, nii or npy")
    if c["dtype"] not in ("float32", "bfloat16", "float16"):
        fail(f"--dtype={c['dtype']}: use float32, bfloat16 or float16")
    if c["num"] < 1 or c["batch_size"] < 1 or c["chunk"] < 0 or c["interp"] < 0 or c["steps"] < 1:
        fail("--num, --batch_size and --steps must be >= 1, --chunk and --interp >= 0")
    try:
        c["device"] = pick_device(c["device"])
    except ValueError as e:
        fail(str(e))
    out = c["out"]
    try:  # an unwritable folder fails here, before the model is loaded or anything computed
        writable_dir(out)
    except ValueError as e:
        fail(str(e))
    model, meta, src = load_model(c)
    n, item, series = plan(c, model)
    stem = (lambda i: f"{series}_{i:02d}") if series else (lambda i: f"seed{c['seed'] + i:06d}")
    ext = "." + c["format"]
    # what would be overwritten, from one listing of the folder: no check per volume, so any --num is fine
    mine = [ext, ".json"] + ([".png"] if c["png"] and not series else [])
    pattern = re.compile((re.escape(series) + "_" if series else "seed") + r"(\d+)("
                         + "|".join(map(re.escape, mine)) + ")")
    taken = []
    for f in sorted(os.listdir(out)):
        m = pattern.fullmatch(f)
        i = int(m.group(1)) - (0 if series else c["seed"]) if m else -1
        if (m and 0 <= i < n and stem(i) + m.group(2) == f) or (c["png"] and series and f == series + ".png"):
            taken.append(f)
    if taken and not c["overwrite"]:
        fail(f"{os.path.join(out, taken[0])} exists ({len(taken)} of the output files do); pass --overwrite or "
             f"another --out")
    affine = output_affine(meta, model.cfg.shape)
    print(f"{n} volume(s) {'x'.join(map(str, model.cfg.shape))} -> {out}/ "
          f"({meta.get('modality', '?')}, {'int16 HU' if meta.get('modality') == 'ct' and meta.get('window') else 'float32'}"
          f", orientation {''.join(nib.aff2axcodes(affine))}), device {c['device']}, {c['dtype']}"
          + (f", chunk {c['chunk']}" if c["chunk"] else ""))
    # a series' montage: at most MONTAGE_ROWS of its volumes, at half resolution
    shown = {round(j * (n - 1) / (MONTAGE_ROWS - 1)) for j in range(MONTAGE_ROWS)} if n > MONTAGE_ROWS else range(n)
    previews = []
    t_all = time.time()
    path, written = out, 0
    try:  # a full disk: one line; write_atomic leaves no temp file, and the volumes written so far are whole
        for i in range(0, n, c["batch_size"]):
            batch = [item(j) for j in range(i, min(i + c["batch_size"], n))]
            z = torch.stack([it[1] for it in batch]).to(c["device"])  # (B, latent_dim)
            cl = None if batch[0][2] is None else torch.tensor([it[2] for it in batch], device=c["device"])
            t = time.time()
            with torch.no_grad(), autocast_ctx(c["device"], c["dtype"]):
                x = model.generate(z, cl, chunk=c["chunk"])  # (B,1,D,H,W) in [-1, 1]
            x = x.float().cpu().numpy()[:, 0]  # (B,D,H,W)
            dt = time.time() - t
            for j, (name, _, k, extra), v in zip(range(i, n), batch, x):
                side = dict(src, seed=extra.pop("seed"), **({} if k is None else {"class": k}), **extra,
                            chunk=c["chunk"], dtype=c["dtype"], shape=list(v.shape))
                path = os.path.join(out, name + ext)
                write_volume(path, v, meta, f"HA-GAN {name}")
                path = os.path.join(out, name + ".json")
                write_atomic(path, lambda p: open(p, "w").write(json.dumps(side, indent=1)))
                if c["png"] and not series:  # mid-planes as prepare.py's stored orientation (S,P,L) shows them
                    path = os.path.join(out, name + ".png")
                    save_montage(path, [v])
                if c["png"] and series and j in shown:
                    previews.append(v[::2, ::2, ::2].copy())  # half resolution keeps a long series' montage small
                written += 1
                pred = " ".join(f"{k2}={v2:.4g}" for k2, v2 in extra.get("predicted", {}).items())
                print(f"{name}{ext}" + ("" if k is None else f" class {k}")
                      + (f" t={extra['t']:.3g}" if "t" in extra else "") + (f" predicted {pred}" if pred else ""))
            print(f"  {dt / len(batch):.2f} s/volume")
        if previews:
            path = os.path.join(out, series + ".png")
            save_montage(path, previews)
    except OSError as e:
        fail(f"{path}: cannot write it ({e.strerror or e}); the {written} volume(s) before it are complete, "
             f"and nothing half-written is left")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux -> GiB
    print(f"done: {n} volume(s) in {time.time() - t_all:.1f}s, peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
