"""
Settings for every script, nanoGPT-style: each script starts with a `config` dict of commented defaults, and
override() changes it from config files and --key=value arguments:

    python train.py config/train_demo.py --batch_size=8 --device cpu

    python train.py --help                                   # every key: its default, range and meaning

Also the few helpers every script needs: fail() (one error line, then exit), pick_device(), autocast(), peak_tflops().
"""

import ast
import io
import json
import math
import os
import sys
import time
import tokenize
from contextlib import nullcontext

import torch


def fail(msg):
    """Exit with the one line 'error: msg' on stderr. Under torchrun only rank 0 says it (and also writes it to
    torchrun's error file, so that torchrun's own failure report names the cause); other ranks exit silently."""
    if int(os.environ.get("RANK", 0)) != 0:
        raise SystemExit(1)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # set by torchrun for each of its processes
        try:
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump(dict(message=dict(message=f"error: {msg}", extraInfo=dict(
                    py_callstack=f"error: {msg}", timestamp=str(int(time.time()))))), f)
        except OSError:
            pass  # the line on stderr is what matters
    raise SystemExit(f"error: {msg}")


def pick_device(name):
    """'auto' -> 'cuda' if available else 'cpu'; a one-line ValueError for a device this torch cannot use."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name}: not a torch device (use cpu, cuda, cuda:1, ... or auto)") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"--device={name}: this torch ({torch.__version__}) is a CPU-only build; "
                             f"use --device=cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device={name}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                             f"use --device=cpu or another index")
    elif dev.type != "cpu" and not getattr(torch, dev.type, None):
        raise ValueError(f"--device={name}: not available in this torch; use cpu or cuda")
    return name


def autocast(device, dtype):
    """torch.autocast for 'bfloat16'/'float16'; nothing for 'float32' (on CPU too, so tests exercise bf16)."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


# dense peak TFLOP/s from vendors' data sheets, not the 2:4-sparse ones: (bf16/fp16 tensor cores, TF32, fp32); the
# first name in torch.cuda.get_device_name() wins. V100, T4: no TF32 or bf16 (fp32's, fp16's); A10G: A10's.
PEAK_TFLOPS = {"NVL": (835, 418, 60), "H100 PCIe": (756, 378, 51), "H100": (989, 495, 67), "H200": (989, 495, 67),
               "A100": (312, 156, 19.5), "A10": (125, 62.5, 31.2), "L40S": (362, 183, 91.6), "L40": (181, 90.5, 90.5),
               "L4": (121, 60, 30.3), "RTX 4090": (165, 82.6, 82.6), "V100": (125, 15.7, 15.7), "T4": (65, 8.1, 8.1)}


def peak_tflops(device, dtype, override=0.0):
    """MFU's denominator: `override` if > 0, else the table's figure for `dtype`, for float32 TF32's while cuDNN may
    use it (cudnn.allow_tf32, on by default: convolutions are nearly all our FLOPs). 0 = unknown (a CPU): no MFU."""
    name = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else ""
    row = next((v for k, v in PEAK_TFLOPS.items() if k in name), (0,) * 3)
    return float(override or (row[0] if dtype != "float32" else row[1] if torch.backends.cudnn.allow_tf32 else row[2]))


def _set(config, k, v, where):
    """config[k] = v, checked: a known key, and the default's type (an int may become a float)."""
    if k not in config:
        close = [c for c in config if c.startswith(k[:3])][:3]
        fail(f"unknown config key '{k}' in {where}" + (f" (did you mean {', '.join(close)}?)" if close else "")
             + f"; known keys: {', '.join(config)}")
    d = config[k]
    if isinstance(d, bool) and not isinstance(v, bool):
        fail(f"{where}: {k} must be True or False, got {v!r}")
    if isinstance(d, float) and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if isinstance(d, (list, tuple)) and isinstance(v, (list, tuple)):
        v = type(d)(v)
    if not (k == "img_size" and isinstance(v, (list, tuple))) and type(v) is not type(d):  # img_size: S or (D, H, W)
        fail(f"{where}: {k} must be {type(d).__name__} like its default {d!r}, got {v!r}")
    config[k] = v


def _run_file(path):
    """A config file's top-level names, executed as Python in an empty namespace (trust it as you trust code)."""
    if not os.path.isfile(path):
        fail(f"{path}: no such config file")
    ns = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), ns)
    except Exception as e:  # report where it broke, in one line
        tb, line = e.__traceback__, getattr(e, "lineno", None)
        while tb is not None and line is None:
            line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == path else None
            tb = tb.tb_next
        fail(f"{path}, line {line or '?'}: {type(e).__name__}: {getattr(e, 'msg', None) or e}")
    return {k: v for k, v in ns.items() if not k.startswith("_") and not callable(v) and not isinstance(v, type(os))}


def _within(v, rule):
    """v obeys rule: '>0', '>=1', '[0,1)' (an interval), or alternatives joined by '|' ('-1|>0')."""
    if "|" in rule:
        return any(_within(v, r) for r in rule.split("|"))
    if rule[0] in "[(":
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        return (v >= lo if rule[0] == "[" else v > lo) and (v <= hi if rule[-1] == "]" else v < hi)
    op = rule.rstrip("-.0123456789e")
    b = float(rule[len(op):]) if op else float(rule)
    return {">": v > b, ">=": v >= b, "<": v < b, "<=": v <= b, "": v == b}[op]


def _help(config, ranges, path):
    """--help: the script's docstring, then each key with its default, allowed range and the comment beside it in
    the script's own `... = dict(...)` of these keys."""
    src = open(path).read()
    notes = {t.start[0]: t.string.lstrip("# ") for t in tokenize.generate_tokens(io.StringIO(src).readline)
             if t.type == tokenize.COMMENT}
    tree = ast.parse(src)
    call = next((n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "dict"
                 and {k.arg for k in n.keywords} == set(config)), None)
    line = {k.arg: k.value.end_lineno for k in call.keywords} if call else {}
    print((ast.get_docstring(tree) or "").strip() + f"\n\nkeys (python {os.path.basename(path)} [config.py ...] "
          f"[--key=value ...]):")
    for k, v in config.items():
        where = f"{k}={v!r}" + (f" ({ranges[k]})" if k in ranges else "")
        print(f"  --{where:<34} {notes.get(line.get(k), '')}")
    raise SystemExit(0)


def override(config, argv=None, given=None, ranges=None):
    """Apply config files and --key=value / --key value arguments to the dict `config`, in order. The default's
    type is the schema; '' and -1 defaults mean 'not given'. A list-valued key repeats (--input=a --input=b); a
    bare boolean flag means True (--overwrite). `given` (a set) collects the keys that were set. `ranges`
    ({key: rule}, see _within) are checked once everything is applied, before the script does any work; -h or
    --help prints the keys and exits."""
    argv = sys.argv[1:] if argv is None else list(argv)
    given = set() if given is None else given
    ranges = ranges or {}
    if {"-h", "--help"} & set(argv):  # the caller's file holds the config's comments
        _help(config, ranges, sys._getframe(1).f_globals.get("__file__", sys.argv[0]))
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            for k, v in _run_file(arg).items():
                _set(config, k, v, arg)
                given.add(k)
            i += 1
            continue
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            i += 1
        elif i + 1 >= len(argv) or (argv[i + 1].startswith("--") and isinstance(config.get(key), bool)):
            val, i = "True", i + 1
        else:
            val, i = argv[i + 1], i + 2
        try:
            v = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            v = val  # a plain string such as a path
        if isinstance(config.get(key), str) and not isinstance(v, str):
            v = val  # '--out=123' is still a path
        if isinstance(config.get(key), list) and not isinstance(v, list):
            v = config[key] + [val]  # one more value of a repeatable option
        _set(config, key, v, f"--{key}")
        given.add(key)
    for k, rule in ranges.items():
        v = config[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (math.isfinite(v) and _within(v, rule)):
            fail(f"--{k}={v!r}: out of range; allowed: {rule}")
    return config
