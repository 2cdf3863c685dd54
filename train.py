"""
Train HA-GAN: the paper's four alternating updates (Sections III-B to III-E), one file, top to bottom.

On one CPU or GPU:
$ python data/demo/prepare.py && python train.py config/train_demo.py
On 2 GPUs of one machine (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on CPU):
$ torchrun --standalone --nproc_per_node=2 train.py config/train_lung_ct.py
On 2 nodes of 8 GPUs each, run on both (the first node's address as the rendezvous endpoint):
$ torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
Resume after a crash, Ctrl-C or a pre-emption (same command plus):
$ python train.py config/train_demo.py --init_from=resume
Fine-tune the official pretrained weights (the other three files are found beside G's):
$ python train.py config/train_lung_ct.py --init_from=/path/to/G_iter80000.pth
"""

import hashlib
import json
import math
import os
import random
import resource
import signal
import sys
import time
from collections import namedtuple
from copy import deepcopy
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist

from eval import band_fractions, ms_ssim_pairs, unit_histogram, wasserstein1
from model import (HAGAN, NETS, HAGANConfig, S_H, augment_params, autocast_ctx, fail, model_config, override,
                   pairwise_l1, pick_device, read_checkpoint)
from prepare import VolumeDataset, store_fingerprint, to_unit, writable_dir
from sample import save_montage

# -----------------------------------------------------------------------------
# default config: the paper's settings for 256^3 (Sec. III-E); config/*.py and --key=value override
config = dict(
    out="out",  # output folder: ckpt.pt (previous one kept as ckpt.prev.pt), config.json, log.jsonl, PNGs
    data_dir="data/demo",  # a folder written by prepare.py
    fold=0,  # held-out fold of the 5-fold split (training uses the other four); -1 = train on every volume
    img_size=-1,  # S, or [D, H, W] for non-cubic volumes; -1 = the prepared data's size (a given S must match it)
    width=1.0,  # channel multiplier of every network (1.0 = the official model)
    latent_dim=1024,  # size of Z
    num_classes=0,  # >0: class-conditional HA-GAN with AC-GAN heads (paper IV-C); labels from the data
    num_slabs=8,  # the depth axis is cut into this many slabs; G^H and D^H see one per iteration (paper: 8)
    batch_size=4,  # global batch: split over ranks and gradient-accumulation steps
    grad_accum=1,  # micro-batches per update on each rank
    max_iters=80000,  # total iterations
    lr_G=1e-4,  # generator (G^A, G^L, G^H)
    lr_E=1e-4,  # both encoders (E^H, E^G)
    lr_D=4e-4,  # both discriminators (D^H, D^L)
    lr_decay_iters=0,  # >0: every learning rate falls linearly from lr_decay_start to 0 at this iteration (0 = constant)
    lr_decay_start=0,  # the iteration where that fall begins
    beta1=0.0,  # Adam betas of all four optimisers
    beta2=0.999,
    lambda1=5.0,  # weight of eq. 6 (E^H reconstruction)
    lambda2=5.0,  # weight of eq. 7 (E^G reconstruction)
    lambda_class=0.1,  # weight of the class term in G's loss (conditional only; official value)
    ema_decay=0.0,  # moving average of G's weights for sampling (e.g. 0.999); 0 = off
    # beyond the paper, for small data sets: all off in the paper's configs (README: "Beyond the paper")
    augment="",  # differentiable augmentation of D's inputs, comma-separated: color,translation,cutout
    augment_p=1.0,  # probability of each augmentation per volume; the start value when ada_target > 0
    ada_target=0.0,  # >0: adapt augment_p so that the mean sign of D(real) stays at this (ADA: 0.6)
    ada_interval=4,  # iterations between adjustments of augment_p
    ada_kimg=2.0,  # thousands of real volumes over which augment_p may go from 0 to 1
    r1_gamma=0.0,  # >0: R1 penalty gamma/2 |grad D(real)|^2, applied lazily every r1_interval iterations
    r1_interval=16,  # iterations between R1 penalties (each weighted by the interval)
    lambda_lecam=0.0,  # >0: weight of LeCam's penalty on D's logits, held near moving averages of D(real) and D(fake)
    lecam_decay=0.99,  # decay of those moving averages
    mbstd_group=0,  # >0: minibatch standard deviation layer in D^H and D^L over groups of this size
    slab_context=False,  # G^H trains on slabs exactly as it renders them in a whole volume (model.py)
    d_width=0.0,  # >0: channel multiplier of D^H and D^L instead of width (a wider D, nearly free on CPU)
    out_scale=1.0,  # >1: G's outputs are out_scale * tanh, so air and the window's top are reached unsaturated
    out_leak=0.0,  # >0: G's outputs also get out_leak * their pre-activation: a gradient even at tanh's floor
    out_clip=False,  # G's outputs clipped to the data's [-1, 1] in training too: the air outside the body stays air
    g_noise=False,  # G^H adds learned-strength per-voxel noise (a function of z): scanner noise that G can't draw
    gh_width=0.0,  # >0: channel multiplier of G^H's hidden layer instead of width (a wider renderer, G^A unchanged)
    g_pad="zeros",  # G^H's conv padding: 'replicate' keeps the volume's first and last slices from turning bright
    g_class=False,  # conditional: a per-class gain and bias in G^H's norm (the class reaches the renderer directly)
    d_stretch=0.0,  # >0: D^H sees intensities stretched near air (slope 1 + d_stretch at -1): the lungs' level counts
    class_window="",  # conditional: "lo,hi[,top]" in HU for CT (in the store's [-1, 1] for MRI): the class term from
    # a classifier of real slabs seen through that window (model.SlabClassifier), over the enclosed voxels below top
    # (default hi), not D's AC-GAN heads; "" = the heads
    class_twin=False,  # with class_window: G's class term is C's minus that of a twin classifier trained on G's slabs
    # (TAC-GAN), so that G matches the real classes instead of overshooting them towards what C is surest of
    lambda_div=0.0,  # >0: weight of a hinge that spreads G's low-res batch at least as much as real volumes
    lambda_rec_G=0.0,  # >0: G also redraws each real volume of its batch from E's code of it (L1, as eq. 7)
    enc_interval=1,  # >1: E^H and E^G train at every enc_interval-th iteration only: G and D never use them, so
    # G's training is unchanged and each skipped pair of updates saves about a third of an iteration (with
    # lambda_rec_G, G's term uses E's codes: then the interval changes G's training too)
    channels_last=False,  # channels-last 3D weights: oneDNN's preferred layout, faster on CPU
    init_from="scratch",  # 'scratch', 'resume' (out/ckpt.pt), or the path of an official G_iterN.pth
    dtype="auto",  # 'float32', 'bfloat16', 'float16' (autocast); 'auto' = bf16 on GPUs that have it, else float32
    device="auto",  # 'cpu', 'cuda', 'cuda:1', ...; 'auto' = cuda if available
    backend="auto",  # DDP backend: 'nccl' on CUDA, 'gloo' on CPU
    compile=False,  # torch.compile the fixed-shape networks
    threads=0,  # CPU threads per process (torch.set_num_threads); 0 = torch's default (torchrun's OMP_NUM_THREADS)
    seed=1337,  # every random draw derives from (seed, rank, iteration): resume is exact
    log_interval=10,  # iterations per log line
    ckpt_interval=1000,  # iterations per checkpoint (and one at the end); 0 = only at the end
    sample_interval=1000,  # iterations per PNG montage of samples and a reconstruction; 0 = never
    num_samples=4,  # volumes in the montage
    quality_num=8,  # generated and real volumes for the quality signal logged with each montage
    wandb_log=False,  # also log to Weights & Biases (imported only then)
    wandb_project="hagan",
    wandb_run_name="run",
)
given = set()  # the keys that config files or the command line set (resume checks them against the checkpoint)
override(config, given=given)

# -----------------------------------------------------------------------------
# processes, devices, precision

# every error is one line from rank 0 (model.fail): the other ranks exit quietly, so it is never printed twice
ddp = int(os.environ.get("RANK", -1)) != -1  # started by torchrun?
try:
    device = pick_device(config["device"])
except ValueError as e:
    fail(str(e))
if config["threads"] < 0:
    fail(f"threads={config['threads']}: use 0 (torch's default) or a number of threads")
if config["enc_interval"] < 1:
    fail(f"enc_interval={config['enc_interval']}: use 1 (the paper: every iteration) or a larger whole number")
if config["lr_decay_iters"] and not 0 <= config["lr_decay_start"] < config["lr_decay_iters"]:
    fail(f"lr_decay_start={config['lr_decay_start']}, lr_decay_iters={config['lr_decay_iters']}: the decay must start "
         f"at an iteration >= 0 and before it ends")
if config["threads"] > 0:
    torch.set_num_threads(config["threads"])
if ddp:
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        # one rank per GPU, cuda:LOCAL_RANK; every rank tests the same condition, so all stop (rank 0 says why)
        if (per_node := int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))) > torch.cuda.device_count():
            fail(f"{per_node} processes on this node, {torch.cuda.device_count()} visible CUDA device(s): start at "
                 f"most one per GPU (--nproc_per_node), or add --device=cpu")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = config["backend"] if config["backend"] != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    dist.init_process_group(backend=backend)
else:
    rank, local_rank, world = 0, 0, 1
master = rank == 0
device_type = torch.device(device).type
dtype = config["dtype"]
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
if dtype not in ("float32", "bfloat16", "float16"):
    fail(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
ctx = autocast_ctx(device, dtype)
if device_type == "cuda":
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
per_rank = config["batch_size"] // (world * config["grad_accum"])
if per_rank * world * config["grad_accum"] != config["batch_size"] or per_rank < 1:
    fail(f"batch_size={config['batch_size']} must be a multiple of world size ({world}) x grad_accum "
         f"({config['grad_accum']})")
if config["log_interval"] < 1 or config["ckpt_interval"] < 0 or config["sample_interval"] < 0:
    fail(f"log_interval={config['log_interval']} must be >= 1, ckpt_interval={config['ckpt_interval']} and "
         f"sample_interval={config['sample_interval']} >= 0 (0: a checkpoint only at the end, no montages)")
if config["lambda_div"] > 0 and per_rank < 2:  # the hinge compares pairs within a micro-batch
    fail(f"lambda_div needs 2 or more volumes per micro-batch, not {per_rank}: raise batch_size or lower grad_accum")


def log(*a):
    if master:
        print(*a, flush=True)


def stop_if_failed(err):
    """Rank 0's file writes can fail (a full disk): err is its one-line reason, or None. Under DDP rank 0
    tells the others (one broadcast), so that every rank stops and none is left waiting in a collective."""
    if ddp:
        flag = torch.tensor([float(err is not None)], device=device)
        dist.broadcast(flag, 0)
        err = err or ("" if flag.item() else None)
    if err is not None:
        fail(err)


# threads: when other jobs share the cores, OpenMP threads spend their time waiting on each other and a
# run slows down several times (README, measured figures); say so, the user can then set --threads
cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
if load > cores or (device_type == "cpu" and local_world * torch.get_num_threads() > cores):
    log(f"warning: oversubscribed: {cores} cores, load average {load:.1f}, {local_world} process(es) x "
        f"{torch.get_num_threads()} threads here; other jobs share the cores, so iterations are slower and "
        f"their times vary (with another job running, --threads=1 is often faster)")
if config["lr_decay_iters"] and config["max_iters"] > config["lr_decay_iters"]:
    log(f"warning: the learning rates reach 0 at lr_decay_iters={config['lr_decay_iters']}, and iterations "
        f"{config['lr_decay_iters']}..{config['max_iters']} learn nothing; to train longer, move lr_decay_start "
        f"and lr_decay_iters too")


def seeded(*key):
    """A 63-bit seed for one (purpose, iteration, ...): nothing depends on how the run got here."""
    h = hashlib.sha256(repr((config["seed"],) + key).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# -----------------------------------------------------------------------------
# data, model, optimisers

out_dir = config["out"]
err = None
if master:
    try:
        writable_dir(out_dir)
    except ValueError as e:
        err = f"{e}; choose another --out"
stop_if_failed(err)

try:
    ds = VolumeDataset(config["data_dir"], split="train", fold=config["fold"])
except (FileNotFoundError, ValueError) as e:
    fail(str(e))
# the architecture keys (HAGANConfig's fields that config has): img_size, latent_dim, num_classes, width,
# num_slabs, slab_context, mbstd_group, d_width, out_scale, out_leak, out_clip, g_noise, gh_width, g_pad, g_class,
# d_stretch, class_window, class_twin (class_window is given in the data's units and kept by the model in [-1, 1]:
# the store's window maps one to the other)
arch = [f.name for f in fields(HAGANConfig) if f.name in config]
try:
    lo_hi = [float(v) for v in config["class_window"].split(",")] if config["class_window"] else []
    if lo_hi and (len(lo_hi) not in (2, 3) or not all(a < b for a, b in zip(lo_hi, lo_hi[1:]))):
        raise ValueError
except ValueError:
    fail(f"--class_window={config['class_window']!r}: give 'lo,hi' or 'lo,hi,top' with lo < hi < top in the data's "
         f"units (e.g. -1000,-800,-500 HU)")
data_window = tuple(ds.meta["window"]) if ds.meta.get("modality") == "ct" else (-1.0, 1.0)  # the units of [-1, 1]
class_window = tuple(float(to_unit(v, data_window)) for v in lo_hi)
if init_from_resume := (config["init_from"] == "resume"):
    # the newest intact checkpoint: ckpt.pt, else ckpt.prev.pt (a damaged file, or a kill between the renames)
    bad = []
    for ckpt_path in (os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "ckpt.prev.pt")):
        if not os.path.exists(ckpt_path):
            continue
        try:
            ckpt = read_checkpoint(ckpt_path)
            missing = [k for k in ("optimizers", "scalers", "iter_num", "rng") if k not in ckpt]
            if missing:
                raise ValueError(f"{ckpt_path}: not a checkpoint train.py can resume (no {', '.join(missing)})")
            cfg = model_config(ckpt["model_args"], ckpt_path)  # the architecture comes from the checkpoint
            break
        except ValueError as e:
            bad.append(str(e))
    else:
        fail(f"{os.path.join(out_dir, 'ckpt.pt')}: nothing to resume; start with --init_from=scratch" if not bad else
             "; ".join(bad) + "; no intact checkpoint to resume from: start again with --init_from=scratch "
             "(in another --out to keep these files)")
    ckpt_trusted = not bad  # a damaged ckpt.pt is overwritten by the next save, not kept as ckpt.prev.pt
    if bad:
        log(f"warning: {bad[0]}; resuming from {ckpt_path} (iteration {ckpt['iter_num']}) instead")
    saved = dict(asdict(cfg), img_size=cfg.shape)  # compare sizes as (D, H, W)
    asked = dict(config, img_size=tuple(config["img_size"]) if isinstance(config["img_size"], list)
                 else (config["img_size"],) * 3, class_window=class_window)
    differ = [f"{k}={config[k]!r} (checkpoint: {saved[k]!r})" for k in arch
              if k in given and asked[k] != saved[k] and config[k] != -1]
    if differ:
        fail(f"{ckpt_path} was trained with other architecture settings than this run's {', '.join(differ)}; "
             f"resume without those settings (the checkpoint's are used) or start a new run in another --out")
else:
    ckpt_trusted = True
    img_size = config["img_size"] if isinstance(config["img_size"], int) else tuple(config["img_size"])
    if img_size == -1:  # the store's size
        img_size = ds.img_size[0] if len(set(ds.img_size)) == 1 else tuple(ds.img_size)
    try:
        cfg = HAGANConfig(**dict({k: config[k] for k in arch}, img_size=img_size, class_window=class_window))
    except ValueError as e:
        fail(str(e))
if tuple(ds.img_size) != cfg.shape:
    want = ds.img_size[0] if len(set(ds.img_size)) == 1 else list(ds.img_size)
    fail(f"{config['data_dir']} holds {'x'.join(map(str, ds.img_size))} volumes but the model is "
         f"{'x'.join(map(str, cfg.shape))}; " + (f"this checkpoint cannot train on them" if init_from_resume else
         f"set --img_size={want} (or leave img_size unset) or prepare the data at this size"))
if len(ds) < per_rank:
    split = "every volume" if config["fold"] == -1 else f"the training split of fold {config['fold']}"
    fail(f"{config['data_dir']}: {split} has {len(ds)} volumes, fewer than one batch ({per_rank}); prepare more "
         f"scans, lower batch_size" + ("" if config["fold"] == -1 else " or train on every volume with --fold=-1"))
if cfg.num_classes:
    nc = ds.meta.get("num_classes", 0)
    if not ds.meta.get("class_column") or nc < 1:
        fail(f"{config['data_dir']} has no class labels; a conditional run needs prepare.py --labels=labels.csv "
             f"with a 'class' column")
    if nc > cfg.num_classes:
        fail(f"{config['data_dir']} has {nc} classes but num_classes={cfg.num_classes}")
    if ds.labels[ds.meta["class_column"]].min() < 0:
        fail(f"{os.path.join(config['data_dir'], 'volumes.csv')}: class {ds.labels[ds.meta['class_column']].min()} is "
             f"negative; prepare the data again with classes 0..K-1 in labels.csv")

held_out = "every volume, fold=-1" if config["fold"] == -1 else f"fold {config['fold']} held out"
log(f"{config['data_dir']}: training on {len(ds)} volumes ({held_out}) of {'x'.join(map(str, cfg.shape))}")
torch.manual_seed(config["seed"])  # initial weights: identical on every rank, and broadcast below anyway
if config["init_from"] not in ("scratch", "resume"):
    g = config["init_from"]
    side = {k: g.replace("G_iter", k + "_iter") for k in ("D", "E", "Sub_E")} if "G_iter" in os.path.basename(g) else {}
    side = {k: p for k, p in side.items() if os.path.exists(p)}
    try:
        model = HAGAN.from_official(G=g, **side, img_size=cfg.img_size, num_slabs=cfg.num_slabs)
    except (ValueError, OSError) as e:
        fail(str(e))
    cfg = model.cfg
    log(f"initialised from the official checkpoint {g} (+ {', '.join(side) or 'no other files'})")
else:
    try:
        model = HAGAN(cfg)
    except ValueError as e:
        fail(str(e))
model.to(device)
if config["channels_last"]:
    model.to(memory_format=torch.channels_last_3d)
opts = model.configure_optimizers(config["lr_G"], config["lr_D"], config["lr_E"], (config["beta1"], config["beta2"]))
base_lr = {k: [g["lr"] for g in o.param_groups] for k, o in opts.items()}  # the configured rates, per group


def lr_scale(it):
    """The factor on every learning rate at iteration it: 1 until lr_decay_start, then linearly down to 0 at
    lr_decay_iters (nanoGPT's decay_lr, linear; beyond, 0). A function of the iteration alone: resume is exact."""
    a, b = config["lr_decay_start"], config["lr_decay_iters"]
    return min(1.0, max(0.0, 1 - (it - a) / (b - a))) if b else 1.0


# fp16 only: one scaler per optimiser, so an overflow in D's backward never shrinks G's scale
scalers = {k: torch.amp.GradScaler(device_type, enabled=dtype == "float16") for k in NETS}
ema = deepcopy(model.G).requires_grad_(False) if config["ema_decay"] > 0 else None
iter_num = 0
aug_ops = [a for a in config["augment"].split(",") if a]
try:
    augment_params(1, cfg.a_shape, aug_ops, 0.0)
except ValueError as e:
    fail(f"--augment={config['augment']}: {e}")
augment_p = config["augment_p"]  # ADA changes it as training goes; saved in the checkpoint
ada_sign = 0.0  # ADA: sum of the mean sign of D(real) since augment_p last changed
lecam_anchor = None  # LeCam: moving averages of D's mean logit on real and on fake inputs, (real, fake)
if init_from_resume:
    try:
        model.load_state_dict(ckpt["model"])
        for k in NETS:
            opts[k].load_state_dict(ckpt["optimizers"][k])
            scalers[k].load_state_dict(ckpt["scalers"][k])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"{ckpt_path}: its weights or optimiser states do not fit its model_args ({type(e).__name__}: "
             f"{(str(e).strip().splitlines() or [''])[-1][:160]})")
    if ema is not None and ckpt.get("ema_G"):
        ema.load_state_dict(ckpt["ema_G"])
    iter_num = ckpt["iter_num"]
    augment_p, ada_sign = ckpt.get("ada", (augment_p, ada_sign))
    lecam_anchor = ckpt.get("lecam")
    rng = ckpt["rng"]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state(tuple(rng["numpy"][:1]) + (np.array(rng["numpy"][1], dtype=np.uint32),) + tuple(rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    if device_type == "cuda" and rng.get("cuda") is not None and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    log(f"resumed from {ckpt_path} at iteration {iter_num}")
    resumed_fingerprint = ckpt.get("fingerprint")
    del ckpt

if ddp:  # no DDP wrapper (4 networks, frozen parts): same start on every rank, gradients reduced by hand
    for t in list(model.state_dict().values()) + ([] if ema is None else list(ema.state_dict().values())):
        dist.broadcast(t, 0)
if config["compile"]:
    # fixed-shape networks only: the slab selection stays eager so 57 values of r never recompile. D^L stays
    # eager under R1, whose penalty differentiates D's input gradient: compiled graphs have no double backward
    for m in (model.G.G_A, model.G.G_L, model.G.G_H, model.E_H, model.E_G) + (() if config["r1_gamma"] else (model.D.D_L,)):
        m.compile()

fingerprint = store_fingerprint(config["data_dir"])
# the diversity hinge's target: the spread of real low-res volumes (64 drawn by the seed alone, so that a
# resumed run and every rank compute the same number)
div_real = 0.0
if config["lambda_div"] > 0:
    x_low = ds.get_batch(64, span=(0, 1), generator=torch.Generator().manual_seed(seeded("div")))[1]
    div_real = pairwise_l1(x_low).item() * len(ds) / max(len(ds) - 1, 1)  # drawn with replacement: same-volume pairs
    if div_real <= 0:
        fail(f"{config['data_dir']}: the training volumes are all alike at low resolution; lambda_div needs a spread")
if init_from_resume and resumed_fingerprint != fingerprint:
    log(f"warning: {config['data_dir']} is not the dataset this checkpoint was trained on "
        f"(fingerprint {fingerprint} vs {resumed_fingerprint}); continuing on the new data")
# what this run uses: the architecture keys as built (from the store's size, or from the checkpoint on resume)
used_config = dict(config, **{k: v for k, v in asdict(cfg).items() if k in arch})
run_config = dict(used_config, resolved=dict(device=device, dtype=dtype, world=world, per_rank_batch=per_rank,
                                             threads=torch.get_num_threads(), model_args=asdict(cfg)))
err = None
if master:
    log(json.dumps(run_config, indent=1, default=str))
    try:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(run_config, f, indent=1, default=str)
    except OSError as e:
        err = (f"{os.path.join(out_dir, 'config.json')}: cannot write it ({e.strerror or e}); free some space or "
               f"choose another --out")
stop_if_failed(err)


def sync_grads(net):
    """Average gradients over ranks: one flat all-reduce per update instead of DDP's hooks."""
    if not ddp:
        return
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def save_checkpoint():
    """Atomic: write a temp file, fsync it, keep the old checkpoint as ckpt.prev.pt, rename. Returns None, or
    the one-line reason why the temp file could not be written (a full disk): then it is removed, and the
    checkpoints already there are untouched."""
    global ckpt_trusted, saved_iter
    rng = dict(python=list(random.getstate()), numpy=[np.random.get_state()[0], np.random.get_state()[1].tolist()]
               + list(np.random.get_state()[2:]), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if device_type == "cuda" else None)
    ck = dict(model=model.state_dict(), model_args=asdict(cfg), ema_G=ema.state_dict() if ema is not None else {},
              optimizers={k: o.state_dict() for k, o in opts.items()},
              scalers={k: s.state_dict() for k, s in scalers.items()},
              iter_num=iter_num, ada=(augment_p, ada_sign), lecam=lecam_anchor, config=used_config, meta=ds.meta,
              fingerprint=fingerprint, rng=rng,
              rank_checksums=rank_checksums)
    path = os.path.join(out_dir, "ckpt.pt")
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ck, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as either
        if os.path.lexists(tmp):
            os.remove(tmp)
        why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [""])[-1][:120]
        return (f"{path}: cannot write the checkpoint of iteration {iter_num} ({why}); nothing was changed, "
                + (f"{path} (iteration {saved_iter}) is intact: free some space and continue with --init_from=resume"
                   if saved_iter is not None else "and no checkpoint was written yet: free some space and start again"))
    if os.path.exists(path) and ckpt_trusted:
        os.replace(path, os.path.join(out_dir, "ckpt.prev.pt"))
    os.replace(tmp, path)
    dfd = os.open(out_dir, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    ckpt_trusted, saved_iter = True, iter_num
    return None


def append_log(rec):
    """One record more in log.jsonl. Returns None, or (path, OSError) when the write fails (a full disk)."""
    path = os.path.join(out_dir, "log.jsonl")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as e:
        return path, e
    return None


def peak_memory_gib():
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@torch.no_grad()
def write_montage(path):
    """Fixed-z samples and one reconstruction G(E(x)) of a real volume, three mid-planes each."""
    G = ema if ema is not None else model.G
    gen = torch.Generator().manual_seed(config["seed"])
    z = torch.randn(config["num_samples"], cfg.latent_dim, generator=gen).to(device)
    c = (torch.arange(config["num_samples"]) % cfg.num_classes).to(device) if cfg.num_classes else None
    was = model.training
    model.eval()
    k = cfg.slab_a  # G^H one training slab of A at a time: sampling needs no more memory than training
    vols = [G.generate(z[i:i + 1], None if c is None else c[i:i + 1], chunk=k)[0, 0].float().cpu().numpy()
            for i in range(len(z))]
    x = torch.from_numpy(ds.volume(0))[None, None].to(device)
    y = torch.tensor([int(ds.labels[ds.meta["class_column"]][0])], device=device) if cfg.num_classes else None
    rec = G.generate(model.encode(x), y, chunk=k)
    save_montage(path, vols + [x[0, 0].cpu().numpy(), rec[0, 0].float().cpu().numpy()])
    model.train(was)
    return float((rec - x).abs().mean())


@torch.no_grad()
def quality_signal():
    """Cheap signs of collapse from quality_num fixed-z samples against as many training volumes:
    MS-SSIM of generated pairs against real pairs (much higher = the samples look alike), the
    Wasserstein-1 distance of voxel intensities in the data's units (HU for CT), and for CT the worst
    tissue band's fraction relative to real. eval.py reports the same measures, with floors."""
    G = ema if ema is not None else model.G
    n = max(2, config["quality_num"])
    gen = torch.Generator().manual_seed(config["seed"] + 1)
    z = torch.randn(n, cfg.latent_dim, generator=gen).to(device)
    c = (torch.arange(n) % cfg.num_classes).to(device) if cfg.num_classes else None
    was = model.training
    model.eval()
    fake = torch.cat([G.generate(z[i:i + 1], None if c is None else c[i:i + 1], chunk=cfg.slab_a).float().cpu()
                      for i in range(n)])  # (n,1,D,H,W)
    model.train(was)
    real = torch.stack([torch.from_numpy(ds.volume(j)) for j in torch.randperm(len(ds), generator=gen)[:n]])[:, None]
    hf, hr = unit_histogram(fake), unit_histogram(real)
    q = dict(ms_ssim=ms_ssim_pairs(fake), ms_ssim_real=ms_ssim_pairs(real), w1=wasserstein1(hf, hr, data_window))
    if ds.meta.get("modality") == "ct":
        bf, br = band_fractions(hf, data_window), band_fractions(hr, data_window)
        q["band_err"] = max(abs(bf[k] / br[k] - 1) for k in br if br[k] > 0)
    return q


# -----------------------------------------------------------------------------
# Ctrl-C and SIGTERM (pre-emption) finish the iteration, save, and exit

stop = []
signal.signal(signal.SIGINT, lambda *_: stop.append("SIGINT"))
signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
if config["wandb_log"] and master:
    try:
        import wandb  # only when asked for
    except ImportError:
        fail("wandb_log=True needs the wandb package (pip install wandb)")
    wandb.init(project=config["wandb_project"], name=config["wandb_run_name"], config=run_config)

# -----------------------------------------------------------------------------
# the paper's four updates (eqs. 4-8), each a call of step(): one network trained, the others frozen

# one micro-batch: whole real volumes x (b,1,D,H,W), their slab S^H(x; r) (b,1,D/num_slabs,H,W) and
# low-res versions (b,1,D/4,H/4,W/4), class labels c (b,) or None, and fresh noise for D's and G's updates
# and, with --augment, the augmentation parameters of D's update (real and fake alike) and of G's
Batch = namedtuple("Batch", "x x_slab x_low c z_D z_G aug_D aug_G")


def step(name, micro, loss_fn):
    """Train network `name` alone on loss_fn(batch) -> (loss, stats), summed over the micro-batches;
    gradients averaged over ranks, then one optimiser step. Returns {name: loss, **stats}, averaged."""
    net = model.train_only(name)
    stats = {}
    for b in micro:
        with ctx:
            loss, more = loss_fn(b)
        scalers[name].scale(loss / len(micro)).backward()
        for k, v in {name: loss, **more}.items():
            stats[k] = stats.get(k, 0.0) + v.detach().float() / len(micro)
    sync_grads(net)
    scalers[name].step(opts[name])
    scalers[name].update()
    opts[name].zero_grad(set_to_none=True)
    return stats


model.train()
saved_iter = iter_num if init_from_resume else None  # the iteration of the checkpoint on disk
rank_checksums = []  # sum of all weights on each rank at the last checkpoint (DDP only)
t0 = time.time()
t_first = None
it_first = iter_num
while iter_num < config["max_iters"]:
    # r: one slab position per iteration, the same on every rank. Volumes and noise: drawn per
    # micro-batch from its place in the global batch, so that 2 ranks x 1 micro-batch and 1 rank x
    # 2 micro-batches see the same data and make the same update
    r = int(torch.randint(0, cfg.r_max + 1, (1,), generator=torch.Generator().manual_seed(seeded("r", iter_num))))
    micro = []
    for m in range(config["grad_accum"]):
        gen = torch.Generator().manual_seed(seeded("batch", iter_num, rank * config["grad_accum"] + m))
        x, x_low, c = ds.get_batch(per_rank, device=device, generator=gen)  # whole volumes: E^G encodes them all
        z_D, z_G = torch.randn(2, per_rank, cfg.latent_dim, generator=gen).to(device)
        aug_D, aug_G = ([augment_params(per_rank, cfg.a_shape, aug_ops, augment_p, gen) for _ in range(2)]
                        if aug_ops else (None, None))
        micro.append(Batch(x, S_H(x, r, cfg.num_slabs), x_low, c if cfg.num_classes else None, z_D, z_G, aug_D, aug_G))
    # lazy R1 (StyleGAN2): every r1_interval iterations, weighted by the interval
    r1 = config["r1_gamma"] / 2 * config["r1_interval"] if config["r1_gamma"] and iter_num % config["r1_interval"] == 0 else 0.0

    scale = lr_scale(iter_num)
    for k, o in opts.items():
        for group, lr in zip(o.param_groups, base_lr[k]):
            group["lr"] = lr * scale
    lecam = (config["lambda_lecam"], *lecam_anchor) if config["lambda_lecam"] and lecam_anchor else None
    stats = step("D", micro, lambda b: model.loss_D(b.x_slab, b.x_low, r, b.z_D, b.c, b.aug_D, r1, b.x, lecam))
    stats |= step("G", micro, lambda b: model.loss_G(r, b.z_G, b.c, config["lambda_class"], b.aug_G,
                                                     config["lambda_div"], div_real, config["lambda_rec_G"],
                                                     (b.x, b.x_slab, b.x_low)))
    if (iter_num + 1) % config["enc_interval"] == 0:
        stats |= step("E_H", micro, lambda b: model.loss_E_H(b.x_slab, config["lambda1"], b.c))
        stats |= step("E_G", micro, lambda b: model.loss_E_G(model.encode_A(b.x), b.x_slab, b.x_low, r, b.c,
                                                             config["lambda2"]))
    if ema is not None:  # G changes only in its own update
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.G.parameters()):
                pe.lerp_(p, 1 - config["ema_decay"])
    iter_num += 1
    err = None  # (path, OSError) of a write of rank 0's that failed

    # one small all-reduce of the stats: for the log and so that every rank agrees to stop on NaN
    names = list(stats)  # the same order on every rank
    vec = torch.stack([stats[k] for k in names])
    if ddp:
        dist.all_reduce(vec)
        vec /= world
    if aug_ops and config["ada_target"] > 0:  # ADA: more augmentation while D is too sure of the reals
        ada_sign += vec[names.index("D_real_sign")].item()
        if iter_num % config["ada_interval"] == 0:
            adjust = config["ada_interval"] * config["batch_size"] / (config["ada_kimg"] * 1000)
            augment_p += adjust if ada_sign / config["ada_interval"] > config["ada_target"] else -adjust
            augment_p, ada_sign = min(max(augment_p, 0.0), 1.0), 0.0
    if config["lambda_lecam"]:  # the averages of every rank's logits: the same anchors on every rank
        d_real, d_fake = vec[names.index("D_real")].item(), vec[names.index("D_fake")].item()
        decay = config["lecam_decay"]
        lecam_anchor = ((d_real, d_fake) if lecam_anchor is None else
                        (decay * lecam_anchor[0] + (1 - decay) * d_real, decay * lecam_anchor[1] + (1 - decay) * d_fake))
    if not torch.isfinite(vec).all():
        bad = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, vec.tolist()) if not math.isfinite(v))
        log(f"error: non-finite loss at iteration {iter_num} ({bad}); stopping without saving, "
            f"{os.path.join(out_dir, 'ckpt.pt')} is the last good checkpoint "
            f"(try a lower learning rate, or dtype=bfloat16 instead of float16)")
        if ddp:
            dist.destroy_process_group()
        sys.exit(1)

    if iter_num == it_first + 1:
        t_first = time.time()  # the first iteration pays for allocation and kernel selection
    if iter_num % config["log_interval"] == 0 or iter_num in (it_first + 1, config["max_iters"]):  # first: a baseline
        vals = dict(zip(names, vec.tolist()), **(dict(augment_p=augment_p) if aug_ops else {}))
        if device_type == "cuda":
            torch.cuda.synchronize()
        done = iter_num - it_first - 1
        dt = (time.time() - t_first) / done if done > 0 else time.time() - t0
        eta = dt * (config["max_iters"] - iter_num)
        log(f"iter {iter_num}: " + " ".join(f"{k} {v:.4f}" for k, v in vals.items())
            + f" | {dt * 1000:.0f} ms/iter, {config['batch_size'] / dt:.2f} vol/s, peak {peak_memory_gib():.2f} GiB, "
            f"ETA {eta / 3600:.1f} h")
        if master:
            rec = dict(iter=iter_num, ms_per_iter=dt * 1000, peak_gib=peak_memory_gib(), **vals)
            err = append_log(rec)
            if config["wandb_log"]:
                wandb.log(rec, step=iter_num)
    if master and config["sample_interval"] and (iter_num % config["sample_interval"] == 0
                                                 or iter_num == config["max_iters"]) and err is None:
        png = os.path.join(out_dir, f"samples_{iter_num:06d}.png")
        try:  # written to a temp file and renamed (sample.write_atomic): a failed write leaves nothing
            rec_l1, q = write_montage(png), quality_signal()
        except OSError as e:
            err = (png, e)
        else:
            log(f"wrote {png} (reconstruction L1 {rec_l1:.4f}) | quality: MS-SSIM of sample pairs {q['ms_ssim']:.3f} "
                f"(real pairs {q['ms_ssim_real']:.3f}), intensity W1 {q['w1']:.1f}" + (" HU" if "band_err" in q else "")
                + (f", worst tissue band off by {100 * q['band_err']:.0f}%" if "band_err" in q else ""))
            err = append_log(dict(iter=iter_num, rec_l1=rec_l1, **q))
    stopping = bool(stop)
    if ddp:  # a signal may reach only some ranks, and rank 0's writes may fail: stop together
        flag = torch.tensor([float(stopping), float(err is not None)], device=device)
        dist.all_reduce(flag)
        stopping = flag[0].item() > 0
        err = err or (None if flag[1].item() == 0 else ("", None))
    if err is not None:  # a full disk: the last checkpoint is intact, and nothing half-written is left
        path, e = err
        fail(f"{path}: cannot write it at iteration {iter_num} ({getattr(e, 'strerror', None) or e}); "
             + (f"{os.path.join(out_dir, 'ckpt.pt')} (iteration {saved_iter}) is intact: free some space and "
                f"continue with --init_from=resume" if saved_iter is not None else
                "no checkpoint was written yet: free some space and start again"))
    every = config["ckpt_interval"]
    saving = (every and iter_num % every == 0) or iter_num == config["max_iters"] or stopping
    if ddp and saving:
        # ranks must hold the same weights; if they drifted, a checkpoint of rank 0 would hide it
        chk = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1)
        every = [torch.zeros_like(chk) for _ in range(world)]
        dist.all_gather(every, chk)
        rank_checksums = [t.item() for t in every]
        if len(set(rank_checksums)) > 1:
            log(f"error: ranks disagree on the weights at iteration {iter_num} ({rank_checksums}); "
                f"not saving. This is a bug: please report it with your config")
            dist.destroy_process_group()
            sys.exit(1)
    if saving:
        err = save_checkpoint() if master else None
        stop_if_failed(err)
        log(f"saved {os.path.join(out_dir, 'ckpt.pt')} at iteration {iter_num}")
    if stopping:
        log(f"stopped by {stop[0] if stop else 'another rank'} at iteration {iter_num}; "
            f"continue with --init_from=resume")
        break

if ddp:
    dist.barrier()
    dist.destroy_process_group()
