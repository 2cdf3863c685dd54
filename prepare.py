"""
Scans -> the memory-mapped training store, and its reader VolumeDataset; also the writers of output files.

HA-GAN (Sun et al., IEEE JBHI 2022, https://arxiv.org/abs/2008.01910) trains on whole low-res volumes, one
high-res slab of each, and (for E^G, eq. 7) whole high-res volumes. Every scan is put into that form once,
here: reoriented, windowed to [-1, 1], trimmed, resampled with anti-aliasing, and stored with its 4x4x4
block means in two float16 .npy memory maps, so that reading a batch is a memcpy.

    python prepare.py --input=scans/ --out=data/copd --img_size=256 --modality=ct --labels=labels.csv --workers=2
    python prepare.py --input="brains/**/*.mgz" --out=data/gsp --modality=mri
    python prepare.py --input=list.txt --input=more/ --out=data/ct160 --img_size=160,256,256 --spacing=1.5
    python data/demo/prepare.py    # the demo data set: phantoms, then prepare_dataset
Inputs: NIfTI, MGH/MGZ, MINC1, Analyze, AFNI, PAR/REC or .npy; files, folders, globs or .txt lists. An input's id
is its path under its --input, file-name safe and unique: scans/sub-01/ct.nii.gz of --input=scans/ is sub-01_ct.
Re-running the same command resumes; the folder is valid once meta.json appears. The store (N inputs;
rows of skipped inputs are holes in sparse files, costing no disk):
    hires.npy    [N, D, H, W]          float16 in [-1, 1], axis 0 = axial, inferior -> superior
    lowres.npy   [N, D/4, H/4, W/4]    float16, 4x4x4 block means of hires
    volumes.csv  one row per input: index, id, source, status, reason, geometry, window, labels, fold
    meta.json    img_size, modality, window, spacing, affine, orientation, labels, complete
Reading it (train.py, encode.py, eval.py):
    ds = VolumeDataset("data/demo", split="train", fold=0)
    x, x_low, labels = ds.get_batch(4, device=device, generator=g)  # (B,1,D,H,W), (B,1,D/4,H/4,W/4), (B,)
    x, x_low, labels = ds.get_batch(4, slab_range(r, D, num_slabs), device, g)  # one slab: (B,1,D/num_slabs,H,W)
"""
import csv
import errno
import glob
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import re
import struct
import sys
import time
import zlib

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from configurator import fail, override

# -----------------------------------------------------------------------------
config = dict(
    input=[],  # files, folders (searched recursively), globs or .txt lists of paths; repeat --input for more
    out="",  # the store's folder (required)
    img_size=256,  # S (cube) or D,H,W, each a multiple of 32
    modality="ct",  # 'ct': HU window [-1024, 600] -> [-1, 1]; 'mri': clip at the foreground's 99.9th percentile
    window="",  # 'LO,HI' overrides the modality's intensity window (source units -> -1, +1)
    spacing=-1.0,  # > 0: resample to this isotropic spacing in mm, then centre-crop/pad; -1 = fit the volume
    stretch=False,  # plain resize of the trimmed volume to the target box (the official code), aspect not kept
    labels="",  # csv with an 'id' column; 'class' (int) for conditional training, other columns floats
    first_volume=False,  # 4D series: use the first volume instead of skipping the file
    workers=1,  # processes; each holds about one raw volume (x4 in float32 temporaries) in memory
)
RANGES = dict(spacing="-1|>0", workers=">=1")  # configurator's rules; img_size by parse_size
# -----------------------------------------------------------------------------

FORMAT_VERSION = 1
CT_WINDOW = (-1024.0, 600.0)        # HA-GAN's COPDGene HU window (paper Sec. IV-A)
MRI_PERCENTILE = 99.9               # GSP: "clipped at top 0.1% quantile" (paper Sec. IV-A)
ORIENTATION = ("S", "P", "L")       # stored axes: axial slices hires[z] show as radiological images
NUM_FOLDS = 5                       # the paper's 5-fold cross-validation
# file endings we pick up when searching folders; the partner files (.img, .HEAD, .REC) are read by nibabel
IMAGE_ENDINGS = (".nii", ".nii.gz", ".mgh", ".mgz", ".mnc", ".hdr", ".brik", ".brik.gz", ".par", ".npy")
STORE_FILES = ("hires.npy", "lowres.npy")  # a store's own arrays: never read back as input scans
MIN_SLICES = 8  # fewer voxels than this along an axis (after trimming blank slices) is not a scan
MAX_SATURATED = 0.5  # more than this share of voxels above the window's high end: not in the window's units
DICOM_HINT = "convert each DICOM series to NIfTI first, e.g. dcm2niix -z y -o nifti/ {src}, then --input=nifti/"
MISSING = ("", "na", "n/a", "nan", "none", "null", "-")  # empty labels.csv cells, as spreadsheets write them
# volumes.csv; orig_*: the source grid reoriented to our axes; out_affine: stored voxel -> RAS+ mm (3 rows)
CSV_FIELDS = ["index", "id", "source", "status", "reason", "orig_shape", "orig_spacing", "orig_axcodes", "orig_affine",
              "window_lo", "window_hi", "trimmed", "nonfinite", "out_spacing", "out_affine"]


# -----------------------------------------------------------------------------
# one scan: read, window, trim, resample


def to_unit(x, window):
    """Source units (HU for CT) -> [-1, 1]: window[0] -> -1, window[1] -> +1, clipped."""
    lo, hi = float(window[0]), float(window[1])
    if isinstance(x, torch.Tensor):
        return ((x - lo) * (2.0 / (hi - lo)) - 1.0).clamp_(-1.0, 1.0)
    return np.clip((np.asarray(x, dtype=np.float32) - lo) * (2.0 / (hi - lo)) - 1.0, -1.0, 1.0)


def from_unit(x, window):
    """[-1, 1] -> source units: the inverse of to_unit inside the window."""
    lo, hi = float(window[0]), float(window[1])
    return (x + 1.0) * ((hi - lo) / 2.0) + lo


def parse_window(s):
    """'LO,HI' -> (lo, hi), or None for ''; a one-line ValueError otherwise."""
    if s in ("", None):
        return None
    try:
        lo, hi = (float(v) for v in str(s).split(","))
    except ValueError:
        raise ValueError(f"--window={s}: use LO,HI in the scans' units, e.g. --window=-1024,600") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"--window={s}: HI must be greater than LO (e.g. --window=-1024,600)")
    return (lo, hi)


def parse_size(s):
    """256 / '256' / '160,256,256' / (D,H,W) -> (D, H, W), each a multiple of 32 from 32 to 512 (model.py's)."""
    try:
        size = tuple(int(v) for v in (s if isinstance(s, (tuple, list)) else str(s).split(",")))
    except ValueError:
        size = ()
    size = size * 3 if len(size) == 1 else size
    if len(size) != 3 or not all(32 <= v <= 512 and v % 32 == 0 for v in size):
        raise ValueError(f"img_size={s}: cannot be built; use S or D,H,W, each a multiple of 32 from 32 to 512")
    return size


def volume_id(name):
    """A path without its image endings: 'sub-01/ct.nii.gz' -> 'sub-01/ct', 'scaled+tlrc.BRIK' -> 'scaled+tlrc'."""
    name = name.replace(os.sep, "/").strip("/")
    for end in (".gz", ".bz2", ".zst"):
        if name.lower().endswith(end):
            name = name[:-len(end)]
    stem, ext = os.path.splitext(name)
    return stem if ext else name


def input_ids(names):
    """Inputs' names (paths under their --input, find_inputs) -> ids: endings dropped, folders joined by '_'
    (safe_name), a clash numbered ('ct', 'ct_2'): 'sub-01/ct.nii.gz' -> 'sub-01_ct'."""
    ids, seen = [], set()
    for n in names:
        base, k = safe_name(volume_id(n)), 1
        vid = base
        while vid in seen:
            k += 1
            vid = f"{base}_{k}"
        seen.add(vid)
        ids.append(vid)
    return ids


def canonical_affine(spacing, shape):
    """Affine of a grid in our stored orientation (S,P,L) with this spacing, centred on the world origin."""
    sd, sh, sw = (float(v) for v in spacing)
    # columns = stored axes; rows = RAS+ world. axis0 -> +S, axis1 -> -A (posterior), axis2 -> -R (left)
    A = np.array([[0, 0, -sw, 0], [0, -sh, 0, 0], [sd, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    A[:3, 3] = -A[:3, :3] @ (np.array(shape, dtype=np.float64) - 1) / 2
    return A


def load_volume(path, first_volume=False):
    """One scan -> (float32 [D,H,W] in the stored orientation S,P,L, its 4x4 affine, spacing (3,) mm); .npy arrays
    have no geometry: taken as already in that orientation, 1 mm voxels. Bad input: ValueError('<path>: why')."""
    path = str(path)
    if path.lower().endswith(".npy"):
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{path}: unreadable .npy ({type(e).__name__}: {e})") from None
        vol = np.ascontiguousarray(_read_3d(path, data, first_volume, copy=True))  # a copy: detached from the map
        return vol, canonical_affine((1, 1, 1), vol.shape), np.ones(3)
    try:
        img = nib.load(path, mmap=False)  # we copy to float32 anyway; a memmap would only pin the file
    except ModuleNotFoundError as e:  # MINC2 (HDF5) needs h5py, which is not one of our dependencies
        raise ValueError(f"{path}: needs the package {e.name} (pip install {e.name}), or convert it to NIfTI") from None
    except Exception as e:
        raise ValueError(f"{path}: not an image nibabel can read ({type(e).__name__}: {e})") from None
    if not hasattr(img, "dataobj") or getattr(img, "affine", None) is None:
        raise ValueError(f"{path}: {type(img).__name__} has no voxel array with an affine")
    vol = _read_3d(path, img.dataobj, first_volume)  # 4D: reads only the first volume
    affine = np.asarray(img.affine, dtype=np.float64)
    sp = np.sqrt((affine[:3, :3] ** 2).sum(0)) if np.all(np.isfinite(affine)) else np.zeros(3)
    # relative to the voxel size, so that a fine grid (microscopy, 1e-3 mm) is not taken for a flat one
    if not np.all(sp > 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-6 * np.prod(sp):
        raise ValueError(f"{path}: degenerate affine (voxel axes {' x '.join(f'{v:.3g}' for v in sp)} mm, "
                         f"not three independent directions)")
    # reorient by axis permutations/flips only (no resampling): the closest axes to (S,P,L)
    xform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                            nib.orientations.axcodes2ornt(ORIENTATION))
    vol = np.ascontiguousarray(nib.orientations.apply_orientation(vol, xform))
    affine = affine @ nib.orientations.inv_ornt_aff(xform, img.dataobj.shape[:3])
    return (vol if vol.flags.writeable else vol.copy()), affine, np.sqrt((affine[:3, :3] ** 2).sum(0))


def _read_3d(path, data, first_volume, copy=False):
    """An array or nibabel proxy -> float32 3D array; a 4D series only with first_volume (its first volume)."""
    shape = tuple(int(v) for v in data.shape)
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise ValueError(f"{path}: 2D image (shape {'x'.join(map(str, shape))}), need a 3D volume")
    extra = shape[3:]
    if any(v > 1 for v in extra) and (not first_volume or len([v for v in extra if v > 1]) > 1):
        raise ValueError(f"{path}: {len(shape)}D series of shape {'x'.join(map(str, shape))} (use --first_volume)")
    try:
        data = data[(slice(None),) * 3 + (0,) * len(extra)] if extra else data
        return np.array(data, dtype=np.float32) if copy else np.asarray(data, dtype=np.float32)
    except Exception as e:  # truncated gzip, short file, corrupt header...
        raise ValueError(f"{path}: unreadable or truncated ({type(e).__name__}: {e})") from None


def prepare_array(vol, spacing, img_size, modality="ct", window=None, out_spacing=-1.0, stretch=False,
                  affine=None):
    """One raw volume (float32 [D0,H0,W0], stored orientation, source units) -> (hires float32 [D,H,W] in [-1,1],
    info), or ValueError(reason). Windowed and trimmed, then resampled to img_size keeping the physical aspect
    ratio (background padding), or at out_spacing mm then centre crop/pad, or stretched to the box."""
    T = parse_size(img_size)
    u, window, (t0, t1), n_bad = _window_and_trim(vol, modality, window)
    n = u.shape
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or not np.all(sp > 0):
        raise ValueError(f"bad voxel spacing {spacing}")
    if stretch:
        step = [n[a] / T[a] for a in range(3)]
    else:
        s = out_spacing if out_spacing > 0 else max(n[a] * sp[a] / T[a] for a in range(3))
        step = [s / sp[a] for a in range(3)]
        fill = [n[a] / step[a] for a in range(3)]  # stored voxels the scan spans along each axis
        a = int(np.argmin([fill[k] / T[k] for k in range(3)]))
        if fill[a] < T[a] / 8:
            fov = " x ".join(f"{n[k] * sp[k]:.0f}" for k in range(3))
            raise ValueError(f"extreme shape: a field of view of {fov} mm fills only {fill[a]:.1f} of the {T[a]} "
                             f"stored voxels along axis {a}, under 1/8 (--stretch resizes it anyway)")
    u = u.contiguous()
    for a in range(3):  # resample axis 0, then rotate (D,H,W) -> (H,W,D): each axis comes first once
        u = _resample_axis0(u, T[a], step[a], -1.0)
        u = u.permute(1, 2, 0).contiguous()
    u = u.clamp_(-1.0, 1.0)  # the filter weights sum to 1 only up to float rounding
    # voxel o of the stored grid sits at raw (trimmed) voxel (o - (T-1)/2)*step + (n-1)/2
    M = np.eye(4)
    M[:3, :3] = np.diag(step)
    M[:3, 3] = [(n[a] - 1) / 2 - (T[a] - 1) / 2 * step[a] + (t0 if a == 0 else 0) for a in range(3)]
    info = dict(window=window, trim=(t0, int(vol.shape[0]) - t1), out_spacing=[step[a] * sp[a] for a in range(3)],
                out_affine=(affine if affine is not None else np.eye(4)) @ M, nonfinite=n_bad)
    return u.contiguous().numpy(), info


def _window_and_trim(vol, modality, window):
    """Source units -> [-1, 1] (NaN/inf -> background), blank axial slices trimmed at both ends ->
    (torch [d,H0,W0], window, (t0, t1) the slices kept, non-finite count). ValueError for what is not a scan."""
    x = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))  # (D0,H0,W0), not modified
    # one sum says whether anything is NaN/inf; only then do we pay for a mask
    finite = None if math.isfinite(float(x.sum(dtype=torch.float64))) else torch.isfinite(x)
    n_bad = 0 if finite is None else int(x.numel() - finite.sum())
    if n_bad == x.numel():
        raise ValueError("no finite voxels")
    vals = x.reshape(-1) if finite is None else x[finite]
    vmin, vmax = (float(v) for v in torch.aminmax(vals))
    if vmax <= vmin:
        raise ValueError(f"constant volume (all voxels {vmin:g})")
    if window is None and modality == "ct":
        window = CT_WINDOW
    elif window is None and modality == "mri":
        # foreground = above the minimum (skull-stripped MRI has a 0 background); 4M voxels are plenty
        fg = vals[vals > vmin]
        fg = fg[::max(1, fg.numel() // 4_000_000)]
        hi = float(np.percentile(fg.numpy(), MRI_PERCENTILE))
        window = (vmin, hi if hi > vmin else vmax)
    elif window is None:
        raise ValueError(f"unknown modality {modality!r}")
    window = (float(window[0]), float(window[1]))
    del vals
    # to_unit, in place on one new array; NaN/inf -> background (before the clamp, which would send +inf to +1)
    u = x - window[0]
    u.mul_(2.0 / (window[1] - window[0])).sub_(1.0)
    if n_bad:
        u.nan_to_num_(nan=-1.0, posinf=-1.0, neginf=-1.0)
    u.clamp_(-1.0, 1.0)
    # trim blank axial slices (all at or below the window's low end) at both ends, as the paper does
    keep = (u.amax(dim=(1, 2)) > -1.0).nonzero()[:, 0]
    if keep.numel() == 0:
        raise ValueError(f"empty: every voxel is at or below the window's low end {window[0]:g}")
    t0, t1 = int(keep[0]), int(keep[-1]) + 1
    u = u[t0:t1]
    n = u.shape
    # what no scan looks like: a few slices (a localiser), or values beyond the window (CT not in HU: no rescale)
    if min(n) < MIN_SLICES:
        a = int(np.argmin(n))
        raise ValueError(f"too thin to be a scan: {n[a]} voxel(s) along axis {a} ({'x'.join(map(str, n))} after "
                         f"trimming blank slices); at least {MIN_SLICES} needed")
    high = float((u >= 1.0).float().mean())
    if high > MAX_SATURATED:
        raise ValueError(f"{100 * high:.0f}% of the voxels are at or above the window's high end {window[1]:g} "
                         f"(not in its units? CT must be in Hounsfield units); set --window=LO,HI or --modality=mri")
    return u, window, (t0, t1), n_bad


def _resample_axis0(x, T, step, bg):
    """x (torch float32, contiguous) resampled along axis 0 to T samples, output o at input (o - (T-1)/2)*step
    + (n-1)/2: a triangle filter, widened by step when shrinking (anti-aliased), linear when enlarging; bg outside."""
    n = x.shape[0]
    if T == n and abs(step - 1.0) < 1e-9:
        return x
    support = max(step, 1.0)
    c = (torch.arange(T, dtype=torch.float64) - (T - 1) / 2) * step + (n - 1) / 2  # (T,)
    K = int(math.ceil(2 * support)) + 1
    idx = torch.floor(c - support).long()[:, None] + 1 + torch.arange(K)  # (T,K) taps
    w = (1 - (idx - c[:, None]).abs() / support).clamp_(min=0)
    w = w / w.sum(1, keepdim=True)
    idx = idx.clamp_(0, n - 1)  # edge replicate
    out = torch.empty((T,) + tuple(x.shape[1:]), dtype=x.dtype)
    # one whole (H,W) plane per multiply-add: contiguous, no temporaries (why the caller rotates the axes)
    for o in range(T):
        if c[o] < -0.5 or c[o] > n - 0.5:
            out[o] = bg
            continue
        taps = [(int(i), float(wk)) for i, wk in zip(idx[o], w[o]) if wk > 0]
        torch.mul(x[taps[0][0]], taps[0][1], out=out[o])
        for i, wk in taps[1:]:
            out[o].add_(x[i], alpha=wk)
    return out


def downsample(hires):
    """hires [D,H,W] -> lowres [D/4,H/4,W/4]: means of 4x4x4 blocks (anti-aliased; the official code: nearest)."""
    x = torch.as_tensor(np.asarray(hires, dtype=np.float32))
    return F.avg_pool3d(x[None, None], 4)[0, 0].numpy()


def prepare_file(path, meta):
    """One scan prepared with a dataset's meta.json settings -> (hires float32 [D,H,W], lowres [D/4,H/4,W/4])."""
    st = meta.get("settings", {})
    vol, affine, spacing = load_volume(path, first_volume=st.get("first_volume", False))
    try:
        hires, _ = prepare_array(vol, spacing, meta["img_size"], meta["modality"], meta.get("window"),
                                 st.get("spacing", -1.0), st.get("stretch", False), affine)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return hires, downsample(hires)


# -----------------------------------------------------------------------------
# a folder of scans: inputs, labels, the store, workers, resume


def writable_dir(path):
    """Check that folder `path` can be made and written, before any long work starts: by making it and a file there,
    then removing what was made, so that a run refused later leaves no empty folder behind."""
    made, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        made.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{path}: cannot write there ({e.strerror or e})") from None
    finally:
        for d in made:  # deepest first; only empty folders go
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)


def is_dicom(path):
    """A DICOM file by its ending, or by the 'DICM' tag after the 128-byte preamble (extensionless files)."""
    if path.lower().endswith((".dcm", ".dicom", ".ima")):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def find_inputs(specs, exclude=""):
    """--input values -> (found, missing): found = [(path, name)] in order, duplicates removed, name the path under
    the --input that found it (a folder, searched recursively; a glob's fixed part; a list's folder; a file: its
    name). A store's own arrays (an --out inside an input folder, `exclude`'s) are never inputs. DICOM files are
    listed in `missing` with how to convert them (a reason starting 'DICOM')."""
    out, missing = [], []
    is_image = lambda p: p.lower().endswith(IMAGE_ENDINGS)
    for spec in specs:
        start = len(out)
        base = os.path.dirname(spec)
        if any(ch in spec for ch in "*?["):
            base = os.path.dirname(spec[:min(spec.find(ch) for ch in "*?[" if ch in spec)])
            found = sorted(glob.glob(spec, recursive=True))
            out += [p for p in found if os.path.isfile(p)]
            if not found:
                missing.append((spec, "glob matches nothing"))
        elif os.path.isdir(spec):
            base, dicom = spec, None
            for root, dirs, files in os.walk(spec):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden: .partial/ writes, .git
                files = [f for f in sorted(files) if not f.startswith(".")]
                out += [os.path.join(root, f) for f in files if is_image(f)]
                if dicom is None:  # the first DICOM file, if any, names the folder's problem
                    dicom = next((os.path.join(root, f) for f in files if not is_image(f) and f.lower() not in
                                  ("labels.csv", "readme", "readme.txt") and is_dicom(os.path.join(root, f))), None)
            if dicom:
                missing.append((spec, f"DICOM files there (e.g. {dicom}) are not read; {DICOM_HINT.format(src=spec)}"))
        elif os.path.isfile(spec) and is_dicom(spec):
            missing.append((spec, f"DICOM file, not read; {DICOM_HINT.format(src=os.path.dirname(spec) or '.')}"))
        elif os.path.isfile(spec) and spec.lower().endswith((".txt", ".lst", ".list")):
            with open(spec) as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
            for ln in lines:
                p = ln if os.path.isabs(ln) else os.path.join(os.path.dirname(spec), ln)
                (out.append(p) if os.path.exists(p) else missing.append((p, "no such file (listed in " + spec + ")")))
        elif os.path.exists(spec):
            out.append(spec)
        else:
            missing.append((spec, "no such file or folder"))
        for k in range(start, len(out)):  # a path outside its base (an absolute list entry): its file name
            rel = os.path.relpath(out[k], base or ".")
            out[k] = (out[k], os.path.basename(out[k]) if rel.startswith("..") else rel)
    own = {os.path.realpath(os.path.join(exclude, f)) for f in STORE_FILES} if exclude else set()
    seen, uniq = set(), []
    for p, name in out:
        rp = os.path.realpath(p)
        if rp not in seen and rp not in own and not is_store_file(rp):
            seen.add(rp)
            uniq.append((p, name))
    return uniq, missing


def is_store_file(path):
    """hires.npy / lowres.npy of a prepared store (a folder with meta.json or _plan.json beside them)."""
    d, name = os.path.split(path)
    return name in STORE_FILES and any(os.path.exists(os.path.join(d, m)) for m in ("meta.json", "_plan.json"))


def read_labels(path):
    """labels.csv -> (columns, {id: {column: value}}), as spreadsheets export it: UTF-8 (with or without a BOM),
    UTF-16 or Latin-1; commas, tabs, or semicolons with decimal commas; quotes; empty trailing columns. 'id' names
    the scan (with or without its file ending); 'class' is an integer >= 0 in every row; other columns are numbers
    or empty/NA. Else a one-line ValueError naming the file, the row (the header is row 1) and the column. An id
    keeps its folders (sub-01/ct.nii.gz -> sub-01/ct): match_labels finds its input."""
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise ValueError(f"--labels={path}: cannot read it ({e.strerror or e})") from None
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        text = raw.decode("utf-16")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")  # any byte decodes; ids and numbers are ASCII anyway
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    delim = max((",", ";", "\t"), key=lambda d: len(next(csv.reader([first], delimiter=d))))
    records = list(csv.reader(io.StringIO(text, newline=""), delimiter=delim))
    h0 = next((i for i, r in enumerate(records) if any(c.strip() for c in r)), len(records))
    header = [h.strip() for h in (records[h0] if h0 < len(records) else [])]
    while header and not header[-1]:
        header.pop()  # empty trailing columns
    names = [{"id": "id", "class": "class"}.get(h.lower(), h) for h in header]
    where = f"{path}: row {h0 + 1} (the header)"
    if "id" not in names:
        raise ValueError(f"{where}: no 'id' column naming each scan (found: {', '.join(header) or 'nothing'})")
    for j, h in enumerate(names):
        if not h:
            raise ValueError(f"{where}: column {j + 1} has no name")
        if names.count(h) > 1:
            raise ValueError(f"{where}: column '{h}' appears twice")
        if h in CSV_FIELDS + ["fold"] and h != "id":
            raise ValueError(f"{where}: column '{h}' is a name volumes.csv uses itself; rename it")
    table, first_row = {}, {}
    for n, row in enumerate(records[h0 + 1:], start=h0 + 2):  # n: the row number a spreadsheet shows
        if not any(c.strip() for c in row):
            continue  # blank lines
        if any(c.strip() for c in row[len(names):]):
            raise ValueError(f"{path}: row {n}: {len(row)} cells but the header names {len(names)} columns")
        cells = {h: (row[j].strip() if j < len(row) else "") for j, h in enumerate(names)}
        vid = cells.pop("id")
        if vid.lower().endswith(IMAGE_ENDINGS + (".img",)):
            vid = volume_id(vid)  # a file name: without its ending
        if not vid:
            raise ValueError(f"{path}: row {n}, column 'id': empty")
        if vid in table:
            raise ValueError(f"{path}: row {n}, column 'id': {vid!r} repeats row {first_row[vid]}; one row per scan")
        table[vid] = {c: _label_value(f"{path}: row {n}, column '{c}'", c, v, delim) for c, v in cells.items()}
        first_row[vid] = n
    return [h for h in names if h != "id"], table


def _label_value(where, column, v, delim):
    """One labels.csv cell -> the text volumes.csv keeps: a class as an integer, a number, or '' when missing."""
    num = v.replace(",", ".") if delim == ";" and v.count(",") == 1 and "." not in v else v  # a decimal comma
    try:
        x = float(num)
    except ValueError:
        x = float("nan")
    if column == "class":
        if v.lower() in MISSING or not (math.isfinite(x) and x == int(x) and x >= 0):
            raise ValueError(f"{where}: {v!r} is not a class, an integer 0, 1, 2, ... (or delete the row)")
        return str(int(x))
    if v.lower() in MISSING:
        return ""
    if not math.isfinite(x):
        raise ValueError(f"{where}: {v!r} is not a number (leave the cell empty for a missing value)")
    return v if num == v else repr(x)


def match_labels(table, ids, names, where):
    """labels.csv's {id: row} -> ({input id: row}, the ids that name no input). A row names an input by its path
    under --input (sub-01/ct, its id sub-01_ct), or by its file name alone where one input has that name; a name
    that several inputs share is a one-line ValueError."""
    stems, known = {}, set(ids)
    for i, n in zip(ids, names):
        stems.setdefault(volume_id(os.path.basename(n)), []).append(i)
    out, unmatched, by = {}, [], {}
    for key, row in table.items():
        vid = safe_name(key) if safe_name(key) in known else None
        if vid is None and len(stems.get(key, ())) > 1:
            raise ValueError(f"{where}: id {key!r} is the file name of {len(stems[key])} inputs ("
                             f"{', '.join(stems[key][:3])}); name each by its path under --input, e.g. "
                             f"{names[ids.index(stems[key][0])]}")
        vid = vid or (stems.get(key) or [None])[0]
        if vid is None:
            unmatched.append(key)
        elif vid in out:
            raise ValueError(f"{where}: ids {by[vid]!r} and {key!r} name the same input {vid}; one row per scan")
        else:
            out[vid], by[vid] = row, key
    return out, unmatched


def prepare_dataset(inputs, out, img_size=256, modality="ct", window="", labels="", workers=1,
                    first_volume=False, spacing=-1.0, stretch=False, on_done=None, log=print):
    """Prepare every input into the folder out; 0 once at least one volume is ok, else a one-line ValueError (before
    any existing file changes). on_done(n_done) is called after each volume (tests simulate a kill with it)."""
    size = parse_size(img_size)
    if modality not in ("ct", "mri"):
        raise ValueError(f"--modality={modality}: unknown modality; use ct or mri")
    win = parse_window(window)
    if int(workers) < 1:
        raise ValueError(f"--workers={workers}: use 1 or more")
    settings = dict(img_size=list(size), modality=modality, window=list(win) if win else None,
                    spacing=float(spacing), stretch=bool(stretch), first_volume=bool(first_volume),
                    labels=os.path.abspath(labels) if labels else "")
    label_cols, table = read_labels(labels) if labels else ([], {})
    writable_dir(out)
    # the plan: one job per input, in order; missing files and unlabeled ids are skipped up front
    found, missing = find_inputs(inputs, exclude=out)
    dicom = [(p, why) for p, why in missing if why.startswith("DICOM")]
    missing = [m for m in missing if m not in dicom]
    if not found and (dicom or missing):  # nothing to read at all: say why before writing anything
        raise ValueError("{}: {}".format(*(dicom or missing)[0]))
    for p, why in dicom:
        log(f"warning: {p}: {why}")
    ids = input_ids([n for _, n in found] + [os.path.basename(p) for p, _ in missing])
    table, unmatched = match_labels(table, ids[:len(found)], [n for _, n in found], labels)
    jobs = []
    for (p, _), vid in zip(found, ids):
        jobs.append(dict(index=len(jobs), id=vid, source=os.path.abspath(p)))
        if labels and vid not in table:
            jobs[-1].update(status="skipped", reason=f"{p}: id {vid} has no row in {labels}")
    for (p, why), vid in zip(missing, ids[len(found):]):
        jobs.append(dict(index=len(jobs), id=vid, source=p, status="skipped", reason=f"{p}: {why}"))
    for key in sorted(unmatched):
        log(f"warning: {labels}: id {key} has no input volume; label ignored")
    if not jobs:
        raise ValueError(f"{', '.join(inputs) or '--input'}: no input scans found there "
                         f"({', '.join(IMAGE_ENDINGS)}); nothing prepared")
    plan = dict(format_version=FORMAT_VERSION, settings=settings, jobs=[(j["id"], j["source"]) for j in jobs])
    done = _open_store(out, plan, log)
    if done is None:
        return 0
    t0 = time.time()
    _run(out, jobs, done, dict(settings, out=out), workers, on_done, log)
    return _finalise(out, plan, jobs, done, label_cols, table, t0, log)


def _open_store(out, plan, log):
    """Resume or start the store in out -> {index: result} of the volumes done, or None when out is complete with this
    plan. Another store there, complete or partial (it has a plan), is refused, never overwritten."""
    mpath, ppath, gpath = (os.path.join(out, n) for n in ("meta.json", "_plan.json", "_progress.jsonl"))
    hpath, lpath = os.path.join(out, "hires.npy"), os.path.join(out, "lowres.npy")
    if os.path.exists(mpath):
        meta = read_meta(mpath)
        if meta.get("plan_sha1") == _sha1(plan):
            log(f"{out}: already complete ({meta['num_volumes']} volumes); nothing to do")
            return None
        raise ValueError(f"{out} holds a different prepared dataset (other inputs or settings); delete it or "
                         f"choose another --out")
    # a store begun here must have this plan (arrays without a plan were not written by this code)
    started = os.path.exists(ppath) or os.path.exists(hpath) or os.path.exists(lpath)
    if started and (not os.path.exists(ppath) or open(ppath, "rb").read() != json.dumps(plan).encode()):
        raise ValueError(f"{out} holds a partial store prepared from other inputs or settings; delete it, "
                         f"re-run the command that started it, or choose another --out")
    done, N = {}, len(plan["jobs"])
    if started and os.path.exists(hpath) and os.path.exists(lpath) and os.path.exists(gpath):
        with open(gpath) as f:
            for ln in f:
                try:
                    res = json.loads(ln)
                    done[res["index"]] = res
                except (ValueError, KeyError):
                    pass  # a line cut short by a kill: that volume is redone
        log(f"{out}: resuming, {len(done)}/{N} inputs already done")
        return done
    os.makedirs(out, exist_ok=True)
    with open(ppath + ".tmp", "w") as f:  # first: from now on this folder says what it is becoming
        json.dump(plan, f)
    os.replace(ppath + ".tmp", ppath)
    # preallocated, sparse until written: 10,000 scans at 256^3 is a 335 GB file but no RAM
    D, H, W = plan["settings"]["img_size"]
    np.lib.format.open_memmap(hpath, mode="w+", dtype=np.float16, shape=(N, D, H, W))
    np.lib.format.open_memmap(lpath, mode="w+", dtype=np.float16, shape=(N, D // 4, H // 4, W // 4))
    open(gpath, "w").close()
    return done


def _run(out, jobs, done, settings, workers, on_done, log):
    """Prepare the jobs not done yet in `workers` processes into done, and into _progress.jsonl as they come."""
    todo = [j for j in jobs if j["index"] not in done and "status" not in j]
    for j in jobs:  # skipped while planning: no progress line needed
        if "status" in j and j["index"] not in done:
            done[j["index"]] = dict(index=j["index"], status=j["status"], reason=j["reason"])
    workers = max(1, min(workers, len(todo)))
    progress = open(os.path.join(out, "_progress.jsonl"), "a")

    def record(res):
        done[res["index"]] = res
        progress.write(json.dumps(res) + "\n")
        progress.flush()
        tag = "ok" if res["status"] == "ok" else "skipped"
        log(f"[{len(done)}/{len(jobs)}] {tag} {jobs[res['index']]['id']} ({res['seconds']:.2f}s)"
            + ("" if tag == "ok" else f": {res['reason']}"))
        if on_done is not None:
            on_done(len(done))
    try:
        if workers == 1:
            nthreads = torch.get_num_threads()
            _worker_init(settings, 1)
            try:
                for j in todo:
                    record(_prepare_one(j))
            finally:
                torch.set_num_threads(nthreads)
        else:
            # spawn, not fork: a forked child of a process that already ran torch ops can hang in OpenMP
            with mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(settings, 1)) as pool:
                for res in pool.imap_unordered(_prepare_one, todo):
                    record(res)
    finally:
        progress.close()


_W = {}  # a worker's settings, set once per process


def _worker_init(settings, threads):
    # one torch thread per worker: we scale with processes; thread pools competing for cores cost far more
    torch.set_num_threads(threads)
    _W.clear()
    _W.update(settings)


def _prepare_one(job):
    """Worker: read, prepare and write volume job['index'] into the memory maps; return its csv fields."""
    i, src, st = job["index"], job["source"], _W
    t = time.time()
    res = dict(index=i)
    try:
        vol, affine, spacing = load_volume(src, st["first_volume"])
        res.update(orig_shape="x".join(map(str, vol.shape)), orig_spacing="x".join(f"{v:.4g}" for v in spacing),
                   orig_axcodes="".join(nib.aff2axcodes(affine)),
                   orig_affine=" ".join(f"{v:.6g}" for v in affine[:3].ravel()))
        try:
            hires, info = prepare_array(vol, spacing, st["img_size"], st["modality"], st["window"],
                                        st["spacing"], st["stretch"], affine)
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from None
        del vol
        lowres = downsample(hires)
        hi = np.load(os.path.join(st["out"], "hires.npy"), mmap_mode="r+")
        lo = np.load(os.path.join(st["out"], "lowres.npy"), mmap_mode="r+")
        hi[i], lo[i] = hires, lowres
        hi.flush()
        lo.flush()
        del hi, lo
        res.update(status="ok", reason="", window_lo=f"{info['window'][0]:.6g}", window_hi=f"{info['window'][1]:.6g}",
                   trimmed="%d,%d" % info["trim"], out_spacing="x".join(f"{v:.5g}" for v in info["out_spacing"]),
                   out_affine=" ".join(f"{v:.6g}" for v in info["out_affine"][:3].ravel()),
                   nonfinite=info["nonfinite"])
    except ValueError as e:
        res.update(status="skipped", reason=str(e).replace("\n", " "))
    except MemoryError:
        res.update(status="skipped", reason=f"{src}: out of memory")
    res["seconds"] = round(time.time() - t, 3)
    return res


def _finalise(out, plan, jobs, done, label_cols, table, t0, log):
    """volumes.csv (per input: its result, labels and fold), then meta.json last: its presence says 'complete'."""
    rows = []
    for j in jobs:
        row = {k: "" for k in CSV_FIELDS + ["fold"]}
        row.update({k: v for k, v in done[j["index"]].items() if k in CSV_FIELDS})
        row.update(index=j["index"], id=j["id"], source=j["source"])
        row.update(table.get(j["id"], {c: "" for c in label_cols}))  # every labelled id has every column
        if row["status"] == "ok" and "class" in label_cols:
            row["class"] = int(row["class"])  # an ok input has a labels row, whose class read_labels checked
        elif row["status"] == "skipped":
            log(f"skipped {row['reason']}")
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    folds = _fold_of([r["id"] for r in ok], [r["class"] if "class" in label_cols else 0 for r in ok])
    for r, fo in zip(ok, folds):
        r["fold"] = fo
    with open(os.path.join(out, "volumes.csv.tmp"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + label_cols + ["fold"])
        w.writeheader()
        w.writerows(rows)
    os.replace(os.path.join(out, "volumes.csv.tmp"), os.path.join(out, "volumes.csv"))
    log(f"{out}: {len(ok)} ok, {len(rows) - len(ok)} skipped, {time.time() - t0:.1f}s")
    if not ok:
        raise ValueError(f"{out}: nothing was prepared, every input was skipped (all reasons in "
                         f"{os.path.join(out, 'volumes.csv')}), the first: {rows[0]['reason']}")
    st = plan["settings"]
    # one spacing/affine for the store (sample.py writes with it): --spacing, or the median of the volumes' own
    sp = np.median(np.array([[float(v) for v in r["out_spacing"].split("x")] for r in ok]), axis=0)
    if st["spacing"] > 0:
        sp = np.full(3, float(st["spacing"]))
    classes = [r["class"] for r in ok] if "class" in label_cols else []
    meta = dict(
        format_version=FORMAT_VERSION, img_size=st["img_size"], modality=st["modality"],
        window=st["window"] or (list(CT_WINDOW) if st["modality"] == "ct" else None),
        window_note=("mri: each volume maps [window_lo, window_hi] of volumes.csv to [-1, 1] (min and 99.9th "
                     "percentile of its foreground)") if (st["modality"] == "mri" and not st["window"]) else "",
        spacing=[float(v) for v in sp], affine=canonical_affine(sp, st["img_size"]).tolist(),
        orientation="".join(ORIENTATION),
        resample="stretch" if st["stretch"] else ("spacing" if st["spacing"] > 0 else "fit"),
        num_volumes=len(ok), num_inputs=len(rows), label_columns=label_cols,
        class_column="class" if "class" in label_cols else "",
        num_classes=(max(classes) + 1) if classes else 0, num_folds=NUM_FOLDS,
        lowres="avg_pool3d 4x4x4 of hires", dtype="float16", settings=st, plan_sha1=_sha1(plan), complete=True)
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))
    for name in ("_plan.json", "_progress.jsonl"):
        os.remove(os.path.join(out, name))
    return 0


def _fold_of(ids, classes):
    """Deterministic, class-stratified 5-fold split: sort by (class, sha1(id)), deal folds round-robin."""
    key = lambda j: (classes[j], hashlib.sha1(ids[j].encode()).hexdigest())
    folds = [0] * len(ids)
    for rank, j in enumerate(sorted(range(len(ids)), key=key)):
        folds[j] = rank % NUM_FOLDS
    return folds


def _sha1(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# -----------------------------------------------------------------------------
# writing volumes and images: sample.py, encode.py, train.py and eval.py write through these


def output_affine(meta, shape):
    """4x4 voxel -> RAS mm of a generated (D,H,W) volume: the dataset's, rescaled about its centre to this grid."""
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
    """[-1, 1] -> the modality's units: CT int16 HU, MRI float32 (in [-1, 1] when its window was per volume)."""
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
    """write(tmp), flushed to the disk and checked, then a rename, so that an interrupted run or a full disk never
    leaves a short file under `path`. An OSError (a full disk) names `path` as its filename."""
    base = os.path.basename(path)
    ext = next((e for e in (".nii.gz", ".nii", ".npy", ".json", ".png", ".csv") if base.endswith(e)), "")
    tmp = os.path.join(os.path.dirname(path), f".{base[:len(base) - len(ext)]}.tmp{os.getpid()}{ext}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # a write error the page cache held back surfaces here
        if ext == ".npy":  # np.save can lose a failed write without raising: its header and length, read back
            try:
                np.load(tmp, mmap_mode="r")
            except ValueError as e:
                raise OSError(errno.EIO, f"written short ({e})") from None
        os.replace(tmp, path)
    except OSError as e:
        e.filename, e.filename2 = path, None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """obj as indented JSON, by write_atomic."""
    write_atomic(path, lambda p: write_bytes(p, json.dumps(obj, indent=1, default=str).encode()))


def write_bytes(p, data):
    with open(p, "wb") as f:  # `with`: an error on close (a full disk) raises
        f.write(data)


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
    """PNG of three mid-planes per volume ([D,H,W] in [-1,1], stored orientation), one row each: axial as
    radiologists view it (anterior up, patient's left on the right), coronal and sagittal (superior up)."""
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

    # a tiny PNG writer, so that we need no imaging package: filter type 0 per scanline, one IDAT chunk
    def png_chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xffffffff)
    raw = b"".join(b"\x00" + line.tobytes() for line in img)
    png = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", img.shape[1], img.shape[0], 8, 0, 0, 0, 0))
           + png_chunk(b"IDAT", zlib.compress(raw, 6)) + png_chunk(b"IEND", b""))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda p: write_bytes(p, png))


# -----------------------------------------------------------------------------
# the store's reader: what train.py, encode.py and eval.py use


def read_meta(path):
    """A dataset's meta.json (sample.py/encode.py --meta); a one-line ValueError if it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read meta.json ({e})") from None


def store_fingerprint(path):
    """A store's identity: 16 hex digits of sha1(meta.json + volumes.csv), kept in checkpoints and feature caches."""
    with open(os.path.join(path, "meta.json"), "rb") as f, open(os.path.join(path, "volumes.csv"), "rb") as g:
        return hashlib.sha1(f.read() + g.read()).hexdigest()[:16]


class VolumeDataset:
    """A prepared folder seen as one split. split='train': every fold but `fold`; 'val': fold `fold`; 'all'."""

    def __init__(self, path, split="train", fold=0):
        path = str(path)
        mpath = os.path.join(path, "meta.json")
        if not os.path.exists(mpath):
            raise FileNotFoundError(f"{path}: no prepared dataset (meta.json missing); run prepare.py, or "
                                    f"data/demo/prepare.py")
        with open(mpath) as f:
            self.meta = json.load(f)
        if not self.meta.get("complete") or self.meta.get("format_version") != FORMAT_VERSION:
            raise FileNotFoundError(f"{path}: incomplete or unknown-version dataset; re-run its prepare.py command")
        if split not in ("train", "val", "all"):
            raise ValueError(f"split={split!r}: use 'train', 'val' or 'all'")
        if not -1 <= fold < NUM_FOLDS or (fold == -1 and split == "val"):
            raise ValueError(f"fold={fold}: use 0..{NUM_FOLDS - 1}" + (", or -1 (no held-out fold) to train on "
                                                                       "every volume" if split != "val" else ""))
        self.path, self.split, self.fold = path, split, fold
        self.img_size = tuple(self.meta["img_size"])  # (D,H,W)
        with open(os.path.join(path, "volumes.csv"), newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
        if split == "train":  # fold -1: every volume
            rows = [r for r in rows if int(r["fold"]) != fold]
        elif split == "val":
            rows = [r for r in rows if int(r["fold"]) == fold]
        if not rows:
            raise ValueError(f"{path}: no volumes in split={split} fold={fold}")
        self.index = np.array([int(r["index"]) for r in rows], dtype=np.int64)  # rows of hires.npy
        self.ids = [r["id"] for r in rows]
        self.folds = np.array([int(r["fold"]) for r in rows], dtype=np.int64)
        self.labels = {}
        for col in self.meta["label_columns"]:
            if col == self.meta["class_column"]:
                self.labels[col] = np.array([int(r[col]) for r in rows], dtype=np.int64)
            else:
                self.labels[col] = np.array([float(r[col]) if r[col] != "" else np.nan for r in rows])
        cls = self.labels.get(self.meta["class_column"])
        self._class = torch.from_numpy(cls if cls is not None else np.zeros(len(rows), dtype=np.int64))
        self._pinned = {}  # CUDA only: two pinned float16 staging buffers per batch shape (get_batch)

    def __len__(self):
        return len(self.index)

    def _maps(self):
        # re-open the maps per call (cheap) as nanoGPT does, so no long-lived np.memmap holds pages
        try:
            hi = np.load(os.path.join(self.path, "hires.npy"), mmap_mode="r")
            lo = np.load(os.path.join(self.path, "lowres.npy"), mmap_mode="r")
        except (OSError, ValueError) as e:  # deleted or cut short since we opened the folder
            raise ValueError(f"{getattr(e, 'filename', None) or self.path}: cannot read the store "
                             f"({getattr(e, 'strerror', None) or e})") from None
        return hi, lo

    def volume(self, j):
        """High-res volume j of this split, float32 [D,H,W] in [-1,1]."""
        return np.array(self._maps()[0][self.index[j]], dtype=np.float32)

    def get_batch(self, batch_size, span=None, device="cpu", generator=None):
        """B random volumes (torch.randint from the caller's CPU generator) -> (x float32 [B,1,stop-start,H,W],
        x_low float32 [B,1,D/4,H/4,W/4], labels int64 [B]). span = (start, stop) along axis 0, e.g. a slab's
        model.slab_range(r, D, num_slabs); None reads whole volumes."""
        D, H, W = self.img_size
        start, stop = span or (0, D)
        if not 0 <= start < stop <= D:
            raise ValueError(f"{self.path}: span {span} is not a voxel range inside depth {D}")
        ix = torch.randint(len(self), (batch_size,), generator=generator)
        rows = self.index[ix.numpy()]
        hi, lo = self._maps()
        device = torch.device(device)
        if device.type != "cuda":  # a plain copy, float16 -> float32
            x = torch.from_numpy(np.array([hi[i, start:stop] for i in rows], dtype=np.float32))[:, None]
            x_low = torch.from_numpy(np.array([lo[i] for i in rows], dtype=np.float32))[:, None]
            return x.to(device), x_low.to(device), self._class[ix].to(device)
        # CUDA: float16 into pinned memory, an asynchronous copy, the cast on the GPU (half the PCIe bytes). Two
        # staging buffers take turns; before refilling one we wait for its own previous copy, not the stream.
        bufs = self._pinned.setdefault((batch_size, stop - start), [])
        if len(bufs) < 2:
            bufs.insert(0, [torch.empty((batch_size, 1, stop - start, H, W), dtype=torch.float16).pin_memory(),
                            torch.empty((batch_size, 1, D // 4, H // 4, W // 4), dtype=torch.float16).pin_memory(),
                            None])
        slot = bufs.pop(0)
        bufs.append(slot)
        if slot[2] is not None:
            slot[2].synchronize()
        for k, i in enumerate(rows):
            np.copyto(slot[0][k, 0].numpy(), hi[i, start:stop])
            np.copyto(slot[1][k, 0].numpy(), lo[i])
        x = slot[0].to(device, non_blocking=True).float()
        x_low = slot[1].to(device, non_blocking=True).float()
        slot[2] = torch.cuda.Event()
        slot[2].record(torch.cuda.current_stream(device))
        return x, x_low, self._class[ix].to(device, non_blocking=True)


def main(argv=None):
    c = override(dict(config), argv, ranges=RANGES)
    if not c["input"] or not c["out"]:
        fail("--input and --out are needed: python prepare.py --input=PATH [--input=PATH ...] --out=data/NAME "
             "[--img_size=256] [--modality=ct|mri]   (the demo: python data/demo/prepare.py)")
    try:
        return prepare_dataset(c["input"], c["out"], c["img_size"], c["modality"], c["window"], c["labels"],
                               c["workers"], c["first_volume"], c["spacing"], c["stretch"])
    except ValueError as e:
        fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
