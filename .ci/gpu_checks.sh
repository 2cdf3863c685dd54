#!/usr/bin/env bash
# The GPU figures of the README's table in one run, sized for one device command (10 min at most): the official
# code's training iteration and ours (bf16, fp32) at S^3, interleaved in fresh processes, SECS seconds each; the
# GPU demo config for ITERS iterations; one BIG^3 volume rendered whole. OUT gets the logs and bench.json files.
# REF is a git-ignored folder of this checkout holding an export of github:batmanlab/HA-GAN and
# ../shared/bench/official_iteration.py (never committed), e.g.
#   mkdir -p .ref && git -C <the official repo> archive HEAD | tar -x -C .ref && cp ../shared/bench/official_iteration.py .ref/
#   pip download nibabel --no-deps -d .ref/wheels   # a GPU image without nibabel installs it from there
#   echo /.ref/ >> .git/info/exclude          # then, on the device machine (carry .ref):
#   bash .ci/gpu_checks.sh $OUT .ref
# Smoke test on a CPU: S=32 SECS=1 DEVICE=cpu WIDTH=0.125 BIG=64 ITERS=4 bash .ci/gpu_checks.sh /tmp/gc .ref
set -uo pipefail
out=$1 ref=$2
S=${S:-256} SECS=${SECS:-10} DEVICE=${DEVICE:-cuda} WIDTH=${WIDTH:-1.0} BIG=${BIG:-512} ITERS=${ITERS:-300} PY=${PY:-python3}
mkdir -p "$out"
"$PY" -c "import nibabel" 2>/dev/null || "$PY" -m pip install -q --no-index --no-deps "$ref"/wheels/nibabel-*.whl
export PYTHONUNBUFFERED=1
log() { echo "== $*" | tee -a "$out/gpu_checks.log"; }
run() { "$@" 2>&1 | tee -a "$out/gpu_checks.log" | tail -n 25; }
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
  | tee "$out/gpu_checks.log"

# 1. one training iteration at S^3, batch 2: the official code and ours in bf16 and fp32, interleaved, fresh processes
for pass in 1 2; do
  if [ "$WIDTH" = 1.0 ]; then  # the official code exists at the paper's widths only
    log "official $S^3 (pass $pass)"
    run env HAGAN_REF="$ref" "$PY" "$ref/official_iteration.py" "$S" "$SECS" "$DEVICE"
  fi
  for dt in bfloat16 float32; do
    [ "$pass" = 2 ] && [ "$dt" = float32 ] && continue
    log "ours $S^3 $dt (pass $pass)"
    run "$PY" eval.py --bench --sizes="$S" --device="$DEVICE" --dtype="$dt" --bench_seconds="$SECS" --store=False \
      --bench_width="$WIDTH" --out="$out/bench_${dt}_$pass"
  done
done

# 2. the GPU demo config: time per iteration (its log lines) over ITERS iterations on the demo's store
log "config/train_demo_gpu.py"
run "$PY" data/demo/prepare.py --out="$out/demo" --num=24 --workers=4
run "$PY" train.py config/train_demo_gpu.py --data_dir="$out/demo" --out="$out/demo_run" --device="$DEVICE" \
  --max_iters="$ITERS" --log_interval=$((ITERS / 6 > 0 ? ITERS / 6 : 1)) --sample_interval=0 --ckpt_interval=0

# 3. one BIG^3 volume, whole (chunk=0), bf16: the render's largest tensor stays under 2^31 elements
log "one $BIG^3 volume, chunk=0"
run "$PY" - "$DEVICE" "$BIG" "$WIDTH" <<'EOF'
import sys, time, torch
from configurator import autocast
from model import HAGAN, HAGANConfig
dev, S, width = torch.device(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
m = HAGAN(HAGANConfig(img_size=S, width=width)).to(dev).eval()
z = torch.randn(1, m.cfg.latent_dim, device=dev)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
with torch.no_grad(), autocast(dev, "bfloat16"):
    for i in range(2):
        t0 = time.perf_counter()
        x = m.generate(z, chunk=0)
        sync()
        print(f"generate {S}^3 chunk=0, pass {i}: {time.perf_counter() - t0:.3f} s, shape {tuple(x.shape)}, "
              f"finite {bool(torch.isfinite(x).all())}")
if dev.type == "cuda":
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")
EOF
log "done"
