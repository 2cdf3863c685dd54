"""
Train HA-GAN: the paper's four alternating updates (Sections III-B to III-E), one file, top to bottom.

One CPU or GPU:
$ python data/demo/prepare.py && python train.py config/train_demo.py
Two GPUs of one machine (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on CPU):
$ torchrun --standalone --nproc_per_node=2 train.py config/train_lung_ct.py
Two nodes of 8 GPUs each, run on both (the first node's address as the rendezvous endpoint):
$ torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
Resume after a crash, Ctrl-C or a pre-emption (the same command plus; without it, a folder holding a run is refused):
$ python train.py config/train_demo.py --init_from=resume
Every key, its default, range and meaning:
$ python train.py --help
Fine-tune the official pretrained weights (D, E and Sub_E are found beside G's file):
$ python train.py config/train_lung_ct.py --init_from=/path/to/G_iter80000.pth
"""

import hashlib
import json
import os
import random
import resource
import signal
import sys
import time
from collections import namedtuple
from copy import deepcopy
from dataclasses import asdict, fields


def stop_early(signum, frame):
    """Ctrl-C or SIGTERM before the loop: one line and the shell's exit code for that signal, no traceback."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"stopped by {signal.Signals(signum).name} before training started", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


signal.signal(signal.SIGINT, stop_early)  # before importing torch, which takes seconds
signal.signal(signal.SIGTERM, stop_early)

import numpy as np
import torch
import torch.distributed as dist

from configurator import autocast, fail, override, peak_tflops, pick_device
from eval import band_fractions, count_flops, ms_ssim_pairs, unit_histogram, wasserstein1
from model import NETS, HAGAN, Extras, HAGANConfig, model_config, pairwise_l1, read_checkpoint
from prepare import (NUM_FOLDS, VolumeDataset, save_montage, store_fingerprint, to_unit, writable_dir, write_atomic,
                     write_bytes, write_json)

# -----------------------------------------------------------------------------
# default config: the paper's settings for 256^3 (Sec. III-E); config/*.py and --key=value override them
config = dict(
    out="out",  # output folder: ckpt.pt (the previous one kept as ckpt.prev.pt), config.json, log.jsonl, PNGs
    data_dir="data/demo",  # a folder written by prepare.py
    fold=0,  # held-out fold of the 5-fold split (training uses the other four); -1 = train on every volume
    init_from="scratch",  # 'scratch', 'resume' (out/ckpt.pt), or the path of an official G_iterN.pth
    overwrite=False,  # a new run into an out that holds one: delete its checkpoints and log.jsonl first
    # the model (HAGANConfig; a resumed run keeps its checkpoint's)
    img_size=-1,  # S, or [D, H, W] for non-cubic volumes; -1 = the prepared data's size
    width=1.0,  # channel multiplier of every network (1.0 = the official model)
    latent_dim=1024,  # size of Z
    num_classes=0,  # > 0: class-conditional HA-GAN (paper IV-C), labels from the data
    num_slabs=8,  # the depth axis is cut into this many slabs; G^H and D^H see one per iteration (paper: 8)
    # the paper's training
    batch_size=4,  # global batch, split over ranks and gradient-accumulation steps
    grad_accum=1,  # micro-batches per update on each rank
    max_iters=80000,  # total iterations
    lr_G=1e-4,  # generator (G^A, G^L, G^H)
    lr_E=1e-4,  # both encoders (E^H, E^G)
    lr_D=4e-4,  # both discriminators (D^H, D^L)
    beta1=0.0,  # Adam's beta1, all four optimisers
    beta2=0.999,  # Adam's beta2
    lambda1=5.0,  # weight of eq. 6 (E^H's reconstruction)
    lambda2=5.0,  # weight of eq. 7 (E^G's reconstruction)
    lambda_class=0.1,  # weight of the class term in G's loss (conditional only; the official value)
    ema_decay=0.0,  # moving average of G's weights for sampling (e.g. 0.999); 0 = off
    # beyond the paper, for data sets of hundreds of scans (README, "Options"); off in the paper's configs
    r1_gamma=0.0,  # > 0: lazy R1 penalty gamma/2 |grad D(real)|^2 every r1_interval iterations
    r1_interval=16,  # iterations between R1 penalties (each weighted by the interval)
    lambda_div=0.0,  # > 0: weight of a hinge that spreads G's low-res batch as much as real volumes
    lr_decay_start=0,  # with lr_decay_iters: the iteration where every learning rate starts falling
    lr_decay_iters=0,  # > 0: every learning rate falls linearly to 0 at this iteration; 0 = constant
    enc_interval=1,  # E^H and E^G update every enc_interval-th iteration only (G and D never use them)
    slab_context=False,  # G^H trains on a slab as it renders it in a whole volume (norm statistics, halo)
    mbstd_group=0,  # > 0: minibatch standard deviation layer in D^H and D^L over groups of this size
    d_width=0.0,  # > 0: channel multiplier of D^H and D^L instead of width
    g_out="tanh",  # G's output: 'tanh' (official), 'scaled' (1.1 tanh), 'clipped' (scaled, clipped to [-1, 1])
    g_noise=False,  # G^H adds per-voxel noise of learned strength (a function of z) before its last conv
    g_pad="zeros",  # G^H's conv padding: 'zeros' (official) or 'replicate'
    g_class=False,  # conditional: a per-class gain and bias in G^H's norm
    d_stretch=0.0,  # > 0: D^H sees intensities stretched near air (slope 1 + d_stretch at -1)
    class_window="",  # conditional: 'lo,hi[,top]' in the data's units: the class term from a classifier C of real slabs
    class_twin=False,  # with class_window: G's class term is C's minus a twin's trained on G's slabs (TAC-GAN)
    # system
    channels_last=False,  # channels-last 3D weights (oneDNN's preferred layout on CPU)
    compile=False,  # torch.compile the fixed-shape networks
    dtype="auto",  # 'float32', 'bfloat16', 'float16' (autocast); 'auto' = bf16 on GPUs that have it, else float32
    device="auto",  # 'cpu', 'cuda', 'cuda:1', ...; 'auto' = cuda if available
    backend="auto",  # DDP backend: 'nccl' on CUDA, 'gloo' on CPU
    threads=0,  # CPU threads per process (torch.set_num_threads); 0 = torch's default
    peak_tflops=0.0,  # the device's peak TFLOP/s for the logged MFU; 0 = configurator.PEAK_TFLOPS's (none on a CPU)
    seed=1337,  # every random draw derives from (seed, rank, iteration): resume is exact
    # logging
    log_interval=10,  # iterations per log line
    ckpt_interval=1000,  # iterations per checkpoint (and one at the end); 0 = only at the end
    sample_interval=1000,  # iterations per PNG montage and quality signal; 0 = never
    num_samples=4,  # volumes in the montage
    quality_num=8,  # generated and real volumes for the quality signal logged with each montage
    wandb_log=False,  # also log to Weights & Biases (imported only then)
    wandb_project="hagan",  # its project
    wandb_run_name="run",  # its run name
)
# the allowed values of the numeric keys (configurator's rules), checked before anything runs; img_size by HAGANConfig
RANGES = dict(fold=f"[-1,{NUM_FOLDS - 1}]", width=">0", latent_dim=">=1", num_classes=">=0", num_slabs=">=1",
              batch_size=">=1", grad_accum=">=1", max_iters=">=1", lr_G=">0", lr_E=">0", lr_D=">0", beta1="[0,1)",
              beta2="[0,1)", lambda1=">=0", lambda2=">=0", lambda_class=">=0", ema_decay="[0,1)", r1_gamma=">=0",
              r1_interval=">=1", lambda_div=">=0", lr_decay_start=">=0", lr_decay_iters=">=0", enc_interval=">=1",
              mbstd_group=">=0", d_width=">=0", d_stretch=">=0", threads=">=0", seed=">=0", log_interval=">=1",
              ckpt_interval=">=0", sample_interval=">=0", num_samples=">=1", quality_num=">=2",
              peak_tflops=">=0")
given = set()  # the keys that config files or the command line set (resume checks them against the checkpoint)
override(config, given=given, ranges=RANGES)
ARCH = [f.name for f in fields(HAGANConfig) if f.name in config]  # the model's keys

# -----------------------------------------------------------------------------
# processes, devices, precision; every error is one line, said by rank 0 alone (configurator.fail)

ddp = int(os.environ.get("RANK", -1)) != -1  # started by torchrun?
try:
    device = pick_device(config["device"])
except ValueError as e:
    fail(str(e))
if config["lr_decay_iters"] and not 0 <= config["lr_decay_start"] < config["lr_decay_iters"]:
    fail(f"lr_decay_start={config['lr_decay_start']}, lr_decay_iters={config['lr_decay_iters']}: the decay must start "
         f"at an iteration >= 0 and before it ends")
if config["threads"] > 0:
    torch.set_num_threads(config["threads"])
if ddp:
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):  # one rank per GPU; every rank tests the same condition, so all stop
        if (per_node := int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))) > torch.cuda.device_count():
            fail(f"{per_node} processes on this node, {torch.cuda.device_count()} visible CUDA device(s): start at "
                 f"most one per GPU (--nproc_per_node), or add --device=cpu")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend=config["backend"] if config["backend"] != "auto" else
                            ("nccl" if device.startswith("cuda") else "gloo"))
else:
    rank, local_rank, world = 0, 0, 1
master = rank == 0
device_type = torch.device(device).type
dtype = config["dtype"]
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
if dtype not in ("float32", "bfloat16", "float16"):
    fail(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
ctx = autocast(device, dtype)
if device_type == "cuda":
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
per_rank = config["batch_size"] // (world * config["grad_accum"])
if per_rank * world * config["grad_accum"] != config["batch_size"] or per_rank < 1:
    fail(f"batch_size={config['batch_size']} must be a multiple of world size ({world}) x grad_accum "
         f"({config['grad_accum']})")
if config["lambda_div"] > 0 and per_rank < 2:  # the hinge compares pairs within a micro-batch
    fail(f"lambda_div needs 2 or more volumes per micro-batch, not {per_rank}: raise batch_size or lower grad_accum")
if config["wandb_log"] and master:
    try:
        import wandb  # only when asked for
    except ImportError:
        fail("wandb_log=True needs the wandb package (pip install wandb)")


def log(*a):
    if master:
        print(*a, flush=True)


def stop_if_failed(err):
    """err: rank 0's one-line reason why a file write failed, or None. Under DDP rank 0 tells the others, so that
    every rank stops and none is left waiting in a collective."""
    if ddp:
        flag = torch.tensor([float(err is not None)], device=device)
        dist.broadcast(flag, 0)
        err = err or ("" if flag.item() else None)
    if err is not None:
        fail(err)


def seeded(*key):
    """A 63-bit seed for one (purpose, iteration, ...): nothing depends on how the run got there."""
    h = hashlib.sha256(repr((config["seed"],) + key).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# when other jobs share the cores, OpenMP threads wait on each other and a run slows down several times
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

# -----------------------------------------------------------------------------
# data, model, optimisers

out_dir = config["out"]
if config["init_from"] != "resume" and not config["overwrite"]:  # a run's folder is its own: never replaced silently
    for name in ("ckpt.pt", "ckpt.prev.pt"):
        if os.path.exists(path := os.path.join(out_dir, name)):
            try:
                at = f"at iteration {read_checkpoint(path, mmap=True).get('iter_num', '?')}"
            except ValueError:
                at = f"({name} is damaged)"
            fail(f"{out_dir} holds a run {at}: pass --init_from=resume to continue or --overwrite to start again")
try:
    ds = VolumeDataset(config["data_dir"], split="train", fold=config["fold"])
except (FileNotFoundError, ValueError) as e:
    fail(str(e))
try:  # class_window is given in the data's units; the model keeps it in [-1, 1] (the store's window maps them)
    lo_hi = [float(v) for v in config["class_window"].split(",")] if config["class_window"] else []
    if lo_hi and (len(lo_hi) not in (2, 3) or not all(a < b for a, b in zip(lo_hi, lo_hi[1:]))):
        raise ValueError
except ValueError:
    fail(f"--class_window={config['class_window']!r}: give 'lo,hi' or 'lo,hi,top' with lo < hi < top in the data's "
         f"units (e.g. -1000,-800,-500 HU)")
data_window = tuple(ds.meta["window"]) if ds.meta.get("modality") == "ct" else (-1.0, 1.0)  # the units of [-1, 1]
class_window = tuple(float(to_unit(v, data_window)) for v in lo_hi)


def resume_checkpoint():
    """(ckpt, path, trusted) of the newest intact checkpoint in out: ckpt.pt, else ckpt.prev.pt (a damaged file,
    or a kill between the renames; then trusted is False and the next save overwrites the damaged file)."""
    bad = []
    for path in (os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "ckpt.prev.pt")):
        if not os.path.exists(path):
            continue
        try:
            ckpt = read_checkpoint(path)
            missing = [k for k in ("optimizers", "scalers", "iter_num", "rng") if k not in ckpt]
            if missing:
                raise ValueError(f"{path}: not a checkpoint train.py can resume (no {', '.join(missing)})")
            model_config(ckpt["model_args"], path)
        except ValueError as e:
            bad.append(str(e))
            continue
        if bad:
            log(f"warning: {bad[0]}; resuming from {path} (iteration {ckpt['iter_num']}) instead")
        return ckpt, path, not bad
    fail(f"{os.path.join(out_dir, 'ckpt.pt')}: nothing to resume; start with --init_from=scratch" if not bad else
         "; ".join(bad) + "; no intact checkpoint to resume from: start again with --init_from=scratch "
         "(in another --out to keep these files)")


def model_settings():
    """The run's HAGANConfig: the checkpoint's on resume (refusing a run that sets one of its keys otherwise), else
    the config's, with the store's size for img_size=-1."""
    if resuming:
        cfg = model_config(ckpt["model_args"], ckpt_path)
        saved = dict(asdict(cfg), img_size=cfg.shape)  # sizes compared as (D, H, W)
        asked = dict(config, class_window=class_window, img_size=tuple(config["img_size"]) if isinstance(
            config["img_size"], list) else (config["img_size"],) * 3)
        differ = [f"{k}={config[k]!r} (checkpoint: {saved[k]!r})" for k in ARCH
                  if k in given and asked[k] != saved[k] and config[k] != -1]
        if differ:
            fail(f"{ckpt_path} was trained with other architecture settings than this run's {', '.join(differ)}; "
                 f"resume without those settings (the checkpoint's are used) or start a new run in another --out")
        return cfg
    img_size = config["img_size"] if isinstance(config["img_size"], int) else tuple(config["img_size"])
    if img_size == -1:
        img_size = ds.img_size[0] if len(set(ds.img_size)) == 1 else tuple(ds.img_size)
    try:
        return HAGANConfig(**dict({k: config[k] for k in ARCH}, img_size=img_size, class_window=class_window))
    except ValueError as e:
        fail(str(e))


def check_data(cfg):
    """The store fits the model: its size, one batch of volumes, its classes."""
    if tuple(ds.img_size) != cfg.shape:
        want = ds.img_size[0] if len(set(ds.img_size)) == 1 else list(ds.img_size)
        fail(f"{config['data_dir']} holds {'x'.join(map(str, ds.img_size))} volumes but the model is "
             f"{'x'.join(map(str, cfg.shape))}; " + ("this checkpoint cannot train on them" if resuming else
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
            fail(f"{os.path.join(config['data_dir'], 'volumes.csv')}: class {ds.labels[ds.meta['class_column']].min()} "
                 f"is negative; prepare the data again with classes 0..K-1 in labels.csv")


resuming = config["init_from"] == "resume"
ckpt, ckpt_path, ckpt_trusted = resume_checkpoint() if resuming else (None, None, True)
cfg = model_settings()
check_data(cfg)
err = None
if master:
    try:
        writable_dir(out_dir)  # created only once everything is checked (config.json below)
    except ValueError as e:
        err = f"{e}; choose another --out"
stop_if_failed(err)
log(f"{config['data_dir']}: training on {len(ds)} volumes ("
    + ("every volume, fold=-1" if config["fold"] == -1 else f"fold {config['fold']} held out") + ") of "
    + "x".join(map(str, cfg.shape)))
torch.manual_seed(config["seed"])  # initial weights: the same on every rank, and broadcast below anyway
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
n_params = {k: sum(p.numel() for p in getattr(model, k).parameters()) for k in NETS}
log(f"HA-GAN {'x'.join(map(str, cfg.shape))}: parameters "
    + ", ".join(f"{k} {v / 1e6:.3g}M" for k, v in n_params.items()))
model.to(device)
if config["channels_last"]:
    model.to(memory_format=torch.channels_last_3d)
opts = model.configure_optimizers(config["lr_G"], config["lr_D"], config["lr_E"], (config["beta1"], config["beta2"]))
base_lr = {k: [g["lr"] for g in o.param_groups] for k, o in opts.items()}  # the configured rates, per group
# fp16 only: one scaler per optimiser, so that an overflow in D's backward never shrinks G's scale
scalers = {k: torch.amp.GradScaler(device_type, enabled=dtype == "float16") for k in NETS}
ema = deepcopy(model.G).requires_grad_(False) if config["ema_decay"] > 0 else None
iter_num = 0
if resuming:
    try:
        model.load_state_dict(ckpt["model"])
        for k in NETS:
            opts[k].load_state_dict(ckpt["optimizers"][k])
            scalers[k].load_state_dict(ckpt["scalers"][k])
            for p, st in opts[k].state.items():  # fused Adam needs its moments in the weights' layout (channels_last)
                st.update({n: torch.empty_like(p).copy_(v) for n, v in st.items() if v.shape == p.shape})
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"{ckpt_path}: its weights or optimiser states do not fit its model_args ({type(e).__name__}: "
             f"{(str(e).strip().splitlines() or [''])[-1][:160]})")
    if ema is not None and ckpt.get("ema_G"):
        ema.load_state_dict(ckpt["ema_G"])
    iter_num = ckpt["iter_num"]
    if iter_num >= config["max_iters"]:
        fail(f"{ckpt_path} is at iteration {iter_num}, max_iters={config['max_iters']}: raise max_iters to train on")
    rng = ckpt["rng"]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state(tuple(rng["numpy"][:1]) + (np.array(rng["numpy"][1], dtype=np.uint32),) + tuple(rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    if device_type == "cuda" and rng.get("cuda") is not None and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    log(f"resumed from {ckpt_path} at iteration {iter_num}")
if ddp:  # no DDP wrapper (4 networks, frozen parts): the same start on every rank, gradients reduced by hand
    for t in list(model.state_dict().values()) + ([] if ema is None else list(ema.state_dict().values())):
        dist.broadcast(t, 0)
if config["compile"]:
    # fixed-shape networks only: the slab selection stays eager, so the values of r never recompile. D^L stays
    # eager under R1, whose penalty differentiates D's input gradient (compiled graphs have no double backward)
    for m in (model.G.G_A, model.G.G_L, model.G.G_H, model.E_H, model.E_G) + (() if config["r1_gamma"] else (model.D.D_L,)):
        m.compile()

fingerprint = store_fingerprint(config["data_dir"])
if resuming and ckpt.get("fingerprint") != fingerprint:
    log(f"warning: {config['data_dir']} is not the dataset this checkpoint was trained on "
        f"(fingerprint {fingerprint} vs {ckpt.get('fingerprint')}); continuing on the new data")
ckpt = None
div_real = 0.0  # the diversity hinge's target: the spread of 64 real low-res volumes drawn by the seed alone
if config["lambda_div"] > 0:
    x_low = ds.get_batch(64, span=(0, 1), generator=torch.Generator().manual_seed(seeded("div")))[1]
    div_real = pairwise_l1(x_low).item() * len(ds) / max(len(ds) - 1, 1)  # drawn with replacement: same-volume pairs
    if div_real <= 0:
        fail(f"{config['data_dir']}: the training volumes are all alike at low resolution; lambda_div needs a spread")
# MFU (nanoGPT's) where the device's peak is known: this rank's FLOPs per iteration, counted once (eval.count_flops)
peak = peak_tflops(device, dtype, config["peak_tflops"])
fl = count_flops(cfg, per_rank) if peak else dict.fromkeys(NETS, 0)
flops = config["grad_accum"] * (fl["D"] + fl["G"] + (fl["E_H"] + fl["E_G"]) / config["enc_interval"])
# what this run uses: the model's keys as built (from the store's size, or from the checkpoint on resume)
used_config = dict(config, **{k: v for k, v in asdict(cfg).items() if k in ARCH})
run_config = dict(used_config, resolved=dict(device=device, dtype=dtype, world=world, per_rank_batch=per_rank,
                                             threads=torch.get_num_threads(), model_args=asdict(cfg)))


def start_files():
    """config.json, and log.jsonl as this run continues it: on resume its records up to the resumed iteration (the
    later ones are redone), else empty, the old run's checkpoints deleted (--overwrite). None, or the failure's line."""
    path = os.path.join(out_dir, "log.jsonl")
    try:
        os.makedirs(out_dir, exist_ok=True)
        keep = []
        if resuming and os.path.exists(path):
            with open(path) as f:
                for ln in f:
                    try:
                        keep += [ln.rstrip("\n") + "\n"] if json.loads(ln)["iter"] <= iter_num else []
                    except (ValueError, KeyError, TypeError):
                        pass  # a line cut short by a kill
        for name in () if resuming else ("ckpt.pt", "ckpt.prev.pt"):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        write_atomic(path, lambda p: write_bytes(p, "".join(keep).encode()))
        write_json(os.path.join(out_dir, "config.json"), run_config)
    except OSError as e:
        return f"{e.filename or out_dir}: cannot write it ({e.strerror or e}); free some space or choose another --out"
    log(f"{os.path.join(out_dir, 'config.json')}: {device}, {dtype}, {world} rank(s) x {per_rank} volume(s) x "
        f"{config['grad_accum']} micro-batch(es), iterations {iter_num + 1}..{config['max_iters']}")
    return None


stop_if_failed(start_files() if master else None)


def lr_scale(it):
    """The factor on every learning rate at iteration it: 1 until lr_decay_start, then linearly down to 0 at
    lr_decay_iters (nanoGPT's decay, linear). A function of the iteration alone: resume is exact."""
    a, b = config["lr_decay_start"], config["lr_decay_iters"]
    return min(1.0, max(0.0, 1 - (it - a) / (b - a))) if b else 1.0


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


# -----------------------------------------------------------------------------
# checkpoints, logs and montages


def save_checkpoint():
    """Atomic: a temp file, fsynced, the old checkpoint kept as ckpt.prev.pt, a rename. Returns None, or the one-line
    reason why the temp file could not be written (a full disk): then it is removed and the checkpoints already
    there are untouched."""
    global ckpt_trusted, saved_iter
    rng = dict(python=list(random.getstate()), numpy=[np.random.get_state()[0], np.random.get_state()[1].tolist()]
               + list(np.random.get_state()[2:]), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if device_type == "cuda" else None)
    ck = dict(model=model.state_dict(), model_args=asdict(cfg), ema_G=ema.state_dict() if ema is not None else {},
              optimizers={k: o.state_dict() for k, o in opts.items()},
              scalers={k: s.state_dict() for k, s in scalers.items()}, iter_num=iter_num, config=used_config,
              meta=ds.meta, fingerprint=fingerprint, rng=rng, rank_checksums=rank_checksums)
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
def samples(z, c=None):
    """Whole volumes (n,1,D,H,W) on the CPU from latents z and classes c (default: in turn), by the EMA generator if
    there is one. G^H runs one training slab of A at a time, so sampling needs no more memory than training."""
    G = ema if ema is not None else model.G
    if c is None and cfg.num_classes:
        c = torch.arange(len(z)) % cfg.num_classes
    was = model.training
    model.eval()
    x = torch.cat([G.generate(z[i:i + 1].to(device), None if c is None else c[i:i + 1].to(device),
                              chunk=cfg.slab_a).float().cpu() for i in range(len(z))])
    model.train(was)
    return x


@torch.no_grad()
def write_montage(path):
    """Fixed-z samples and one reconstruction G(E(x)) of a real volume, three mid-planes each; returns its L1."""
    z = torch.randn(config["num_samples"], cfg.latent_dim, generator=torch.Generator().manual_seed(config["seed"]))
    x = torch.from_numpy(ds.volume(0))[None, None]
    y = torch.tensor([int(ds.labels[ds.meta["class_column"]][0])]) if cfg.num_classes else None
    rec = samples(model.encode(x.to(device)), y)
    save_montage(path, list(samples(z)[:, 0].numpy()) + [x[0, 0].numpy(), rec[0, 0].numpy()])
    return float((rec - x).abs().mean())


def quality_signal():
    """Cheap signs of collapse, quality_num samples against as many training volumes: the MS-SSIM of generated pairs
    beside real pairs' (much higher = the samples look alike), the intensity Wasserstein-1 in the data's units, and
    for CT the worst tissue band's fraction relative to real. eval.py reports the same measures, with floors."""
    n = config["quality_num"]
    gen = torch.Generator().manual_seed(config["seed"] + 1)
    fake = samples(torch.randn(n, cfg.latent_dim, generator=gen))
    real = torch.stack([torch.from_numpy(ds.volume(j)) for j in torch.randperm(len(ds), generator=gen)[:n]])[:, None]
    hf, hr = unit_histogram(fake), unit_histogram(real)
    q = dict(ms_ssim=ms_ssim_pairs(fake), ms_ssim_real=ms_ssim_pairs(real), w1=wasserstein1(hf, hr, data_window))
    if ds.meta.get("modality") == "ct":
        bf, br = band_fractions(hf, data_window), band_fractions(hr, data_window)
        q["band_err"] = max(abs(bf[k] / br[k] - 1) for k in br if br[k] > 0)
    return q


# -----------------------------------------------------------------------------
# the paper's four updates (eqs. 4-8), each a step(): one network trained, the others frozen

# one micro-batch: whole real volumes x (b,1,D,H,W) and their low-res versions (b,1,D/4,H/4,W/4), class labels c
# (b,) or None, and fresh noise for D's and G's updates
Batch = namedtuple("Batch", "x x_low c z_D z_G")


def draw(it):
    """Iteration it's slab start r, the same on every rank, and this rank's micro-batches. Volumes and noise come from
    each micro-batch's place in the global batch: 2 ranks x 1 micro-batch and 1 rank x 2 make the same update."""
    r = random.Random(seeded("r", it)).randint(0, cfg.r_max)
    micro = []
    for m in range(config["grad_accum"]):
        slot = rank * config["grad_accum"] + m
        gen = torch.Generator().manual_seed(seeded("batch", it, slot))
        x, x_low, c = ds.get_batch(per_rank, device=device, generator=gen)  # whole volumes: E^G encodes them all
        z_gen.manual_seed(seeded("z", it, slot))  # drawn on the device: no copy from the host
        z_D, z_G = torch.randn(2, per_rank, cfg.latent_dim, generator=z_gen, device=device)
        micro.append(Batch(x, x_low, c if cfg.num_classes else None, z_D, z_G))
    return r, micro


def step(name, micro, loss_fn):
    """Train network `name` alone on loss_fn(batch) -> (loss, stats), summed over the micro-batches; gradients
    averaged over ranks, then one optimiser step. Returns {name: loss, **stats}, averaged."""
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


def train_iteration(it):
    """One iteration: D, G, E^H and E^G in turn at one slab start r. Returns the stats of the four updates."""
    r, micro = draw(it)
    for k, o in opts.items():
        for group, lr in zip(o.param_groups, base_lr[k]):
            group["lr"] = lr * lr_scale(it)
    lazy = config["r1_gamma"] and it % config["r1_interval"] == 0  # lazy R1 (StyleGAN2), weighted by the interval
    extra = Extras(r1=config["r1_gamma"] / 2 * config["r1_interval"] if lazy else 0.0, lambda_div=config["lambda_div"],
                   div_real=div_real, lambda_class=config["lambda_class"])
    stats = step("D", micro, lambda b: model.loss_D(b.x, b.x_low, r, b.z_D, b.c, extra))
    stats |= step("G", micro, lambda b: model.loss_G(r, b.z_G, b.c, config["lambda_class"], extra))
    if (it + 1) % config["enc_interval"] == 0:
        stats |= step("E_H", micro, lambda b: model.loss_E_H(b.x, r, b.c, config["lambda1"]))
        stats |= step("E_G", micro, lambda b: model.loss_E_G(b.x, b.x_low, r, b.c, config["lambda2"]))
    if ema is not None:  # G changes only in its own update
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, G_params, 1 - config["ema_decay"])
    global first_bad  # on the device, read at log time and before a save: no wait for the GPU here
    first_bad = torch.where(~torch.isfinite(torch.stack(list(stats.values()))).all() & (first_bad < 0), it + 1,
                            first_bad)
    return stats


def check_finite():
    """Every rank stops, without saving, if some rank met a non-finite loss since the start (reads the device)."""
    bad = first_bad.clone()
    if ddp:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() >= 0:
        log(f"error: non-finite loss at iteration {bad.item()}; stopping without saving, "
            f"{os.path.join(out_dir, 'ckpt.pt')} is the last good checkpoint "
            f"(try a lower learning rate, or dtype=bfloat16 instead of float16)")
        if ddp:
            dist.destroy_process_group()
        sys.exit(1)


def reduce_stats(stats):
    """The stats averaged over ranks, as {name: float}, after check_finite."""
    check_finite()
    names = list(stats)  # the same order on every rank
    vec = torch.stack([stats[k] for k in names])
    if ddp:
        dist.all_reduce(vec)
        vec /= world
    return dict(zip(names, vec.tolist()))


def reported(it):
    """Whether report() logs (1) or writes a montage (2) at iteration it."""
    every = config["sample_interval"]
    return (it % config["log_interval"] == 0 or it in (it_first + 1, config["max_iters"])) \
        + 2 * bool(every and (it % every == 0 or it == config["max_iters"]))


def report(stats):
    """The log line and log.jsonl record, and at sample_interval the montage and the quality signal (rank 0).
    Returns None, or (path, OSError) of a write that failed."""
    global t_first
    if iter_num == it_first + 1:
        t_first = time.time()  # the first iteration pays for allocation and kernel selection
    err = None
    if reported(iter_num) & 1:
        if device_type == "cuda":
            torch.cuda.synchronize()
        vals = reduce_stats(stats)
        done = iter_num - it_first - 1
        dt = (time.time() - t_first) / done if done > 0 else time.time() - t0
        mfu = flops / dt / (peak * 1e12) if peak and done > 0 else None  # from the second iteration on
        log(f"iter {iter_num}: " + " ".join(f"{k} {v:.4f}" for k, v in vals.items())
            + f" | {dt * 1000:.0f} ms/iter, {config['batch_size'] / dt:.2f} vol/s, peak {peak_memory_gib():.2f} GiB, "
            f"ETA {dt * (config['max_iters'] - iter_num) / 3600:.1f} h" + (f", MFU {mfu:.1%}" if mfu else ""))
        if master:
            rec = dict(iter=iter_num, ms_per_iter=dt * 1000, peak_gib=peak_memory_gib(), **vals,
                       **({"mfu": mfu} if mfu else {}))
            err = append_log(rec)
            if config["wandb_log"]:
                wandb.log(rec, step=iter_num)
    if master and reported(iter_num) & 2 and err is None:
        png = os.path.join(out_dir, f"samples_{iter_num:06d}.png")
        try:
            rec_l1, q = write_montage(png), quality_signal()
        except OSError as e:
            return png, e
        log(f"wrote {png} (reconstruction L1 {rec_l1:.4f}) | quality: MS-SSIM of sample pairs {q['ms_ssim']:.3f} "
            f"(real pairs {q['ms_ssim_real']:.3f}), intensity W1 {q['w1']:.1f}" + (" HU" if "band_err" in q else "")
            + (f", worst tissue band off by {100 * q['band_err']:.0f}%" if "band_err" in q else ""))
        err = append_log(dict(iter=iter_num, rec_l1=rec_l1, **q))
    return err


def save_if_due(stopping, err):
    """Stop on a failed write (the last checkpoint is intact); save at ckpt_interval, at the end and when stopping,
    after checking under DDP that the ranks hold the same weights."""
    global rank_checksums
    every = config["ckpt_interval"]
    due = (every and iter_num % every == 0) or iter_num == config["max_iters"]
    talk = due or iter_num % 10 == 0 or reported(iter_num)  # the same iterations on every rank
    if ddp and talk:  # a signal may reach only some ranks, and rank 0's writes may fail: decide together
        flag = torch.tensor([float(stopping), float(err is not None)], device=device)
        dist.all_reduce(flag)
        stopping = flag[0].item() > 0
        err = err or (None if flag[1].item() == 0 else ("", None))
    if err is not None:
        path, e = err
        fail(f"{path}: cannot write it at iteration {iter_num} ({getattr(e, 'strerror', None) or e}); "
             + (f"{os.path.join(out_dir, 'ckpt.pt')} (iteration {saved_iter}) is intact: free some space and "
                f"continue with --init_from=resume" if saved_iter is not None else
                "no checkpoint was written yet: free some space and start again"))
    if not (due or stopping) or (ddp and not talk):
        return stopping
    check_finite()
    if ddp:
        chk = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1)
        sums = [torch.zeros_like(chk) for _ in range(world)]
        dist.all_gather(sums, chk)
        rank_checksums = [t.item() for t in sums]
        if len(set(rank_checksums)) > 1:
            log(f"error: ranks disagree on the weights at iteration {iter_num} ({rank_checksums}); "
                f"not saving. This is a bug: please report it with your config")
            dist.destroy_process_group()
            sys.exit(1)
    stop_if_failed(save_checkpoint() if master else None)
    log(f"saved {os.path.join(out_dir, 'ckpt.pt')} at iteration {iter_num}")
    return stopping


# -----------------------------------------------------------------------------
# the loop; Ctrl-C and SIGTERM (a pre-emption) finish the iteration, save and exit with 130 and 143 as a kill would

stop = []
signal.signal(signal.SIGINT, lambda *_: stop.append("SIGINT"))
signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
if config["wandb_log"] and master:
    wandb.init(project=config["wandb_project"], name=config["wandb_run_name"], config=run_config)
model.train()
saved_iter = iter_num if resuming else None  # the iteration of the checkpoint on disk
rank_checksums = []  # the sum of all weights on each rank at the last checkpoint (DDP only)
t0, t_first, it_first = time.time(), None, iter_num
first_bad = torch.tensor(-1, device=device)  # the first iteration with a non-finite loss (train_iteration)
z_gen = torch.Generator(device)  # draw()'s latents
ema_params, G_params = (list(ema.parameters()), list(model.G.parameters())) if ema is not None else ([], [])


def one_iteration():
    """train_iteration, then the log, the montage and the checkpoint where due. True: stop now."""
    global iter_num
    stats = train_iteration(iter_num)
    iter_num += 1
    return save_if_due(bool(stop), report(stats))


stopped = None
while iter_num < config["max_iters"]:
    if one_iteration():
        stopped = stop[0] if stop else "SIGTERM"  # another rank's signal: a pre-emption, as a rule
        log(f"stopped by {stop[0] if stop else 'another rank'} at iteration {iter_num}; "
            f"continue with --init_from=resume")
        break
if ddp:
    dist.barrier()
    dist.destroy_process_group()
if stopped:  # not 0: `train.py && eval.py` evaluates finished runs only
    sys.exit(128 + getattr(signal, stopped))
