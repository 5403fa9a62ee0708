#!/usr/bin/env bash
# cotune's GPU check: on a machine with CUDA, run the GPU test subset and the GPU benchmarks and
# print their figures. Usage, from the repository root:
#
#   bash scripts/gpu_check.sh                 # every part (about 8-10 minutes on an H200)
#   bash scripts/gpu_check.sh tests lora-step # some parts: tests lora-step split-mfu
#                                             #   fedavg-cohort cohort-cpu split-grpc
#   bash scripts/gpu_check.sh prepare        # only ready the Python (wheels, src/) and import
#                                             #   cotune: no GPU needed, to try the offline set-up
#   PY=/path/to/python bash scripts/gpu_check.sh
#
# Which Python: $PY; else .venv's if its torch sees CUDA; else python3 if its torch does (a GPU
# image's own, e.g. torch 2.11 where cotune pins 2.13: the check runs on it, and says which).
# cotune runs from src/ when that Python has not installed it. What the Python lacks of
# cotune's needs is installed from wheels in .whl/ without an index (scripts/gpu_wheels.sh
# makes them on a machine that reaches one; a lent GPU box reaches none; GPU_CHECK_WHEELS names
# another folder); with no wheels and no CUDA Python at all, the script makes .venv-gpu from
# the package index. Results go to stdout
# and to gpu_check/ (a log per part).
#
# The split-grpc part is issue 13's split-step ratio (gRPC / local engine) on this machine's
# CPU cores: a 2-core machine runs five processes on two cores, a GPU box has a core for each
# process thread. It trains a random BERT of MiniLM's shape (the MiniLM package is too large
# to carry); the arithmetic per step is MiniLM's. The cohort-cpu part is issue 14's CPU figure
# (fedavg round host time, cohort / one by one, 8 devices x batch 4) on the same cores, on the
# same random MiniLM-shaped BERT: on two cores a batch of 4 already keeps both busy.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-gpu_check}
mkdir -p "$OUT"
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(tests lora-step split-mfu fedavg-cohort cohort-cpu split-grpc)
PREPARE_ONLY=0
[ "${PARTS[*]}" = prepare ] && PREPARE_ONLY=1
WHEELS=${GPU_CHECK_WHEELS:-.whl}
has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && has_cuda .venv/bin/python; then PY=.venv/bin/python
  elif command -v python3 >/dev/null && has_cuda python3; then PY=python3
  elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
  else PY=python3; fi
fi
if [ "$PREPARE_ONLY" = 0 ] && ! has_cuda "$PY"; then
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU on this machine (nvidia-smi finds none): nothing to check" >&2
    exit 2
  fi
  echo "gpu_check: $PY has no CUDA torch; installing one into .venv-gpu" >&2
  python3 -m venv .venv-gpu
  PY=.venv-gpu/bin/python
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 \
    || "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q -e ".[dev]"
  has_cuda "$PY" || { echo "gpu_check: torch still sees no GPU" >&2; exit 2; }
fi
# What cotune and the check import beyond torch and transformers (peft: the 0.21 series the
# parity tests compare with).
needs_ok() {
  "$PY" - <<'PYEOF' 2>/dev/null
import importlib, sys
for name in ("pydantic", "crc32c", "cryptography", "bitsandbytes", "grpc", "yaml", "pytest",
             "safetensors", "matplotlib"):
    importlib.import_module(name)
import peft
sys.exit(0 if peft.__version__.startswith("0.21.") else 1)
PYEOF
}
if ! needs_ok; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=${GPU_CHECK_SITE:-/tmp/cotune-gpu-site}
    echo "gpu_check: installing $WHEELS/ into $SITE (no index)" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl || exit 2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    "$PY" -m pip install -q -e ".[dev]"
  fi
  needs_ok || { echo "gpu_check: $PY still lacks cotune's packages (see above)" >&2; exit 2; }
fi
"$PY" -c "import cotune" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# Everything the parts import, before any GPU time is spent on them.
"$PY" -c "import cotune.run, cotune.deploy.launch, cotune.peft, peft, bitsandbytes" \
  || { echo "gpu_check: cotune does not import with $PY (see above)" >&2; exit 2; }
if [ "$PREPARE_ONLY" = 1 ]; then
  echo "gpu_check: ready: $PY, PYTHONPATH=${PYTHONPATH:-}"
  exit 0
fi

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'PYEOF' | tee "$OUT/device.txt"
import os, sys, torch, transformers
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
      f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
PYEOF
status=0
run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name: exit $rc"; status=1; }
}
for part in "${PARTS[@]}"; do
  case $part in
    tests) run tests 240 "$PY" -m pytest -q tests/gpu tests/accel -p no:cacheprovider ;;
    lora-step) run lora-step 120 "$PY" benchmarks/gpu_lora_step.py --batch 8 --seq 512 \
      --blocks 5 --steps 5 ;;
    split-mfu) run split-mfu 60 "$PY" benchmarks/gpu_split_mfu.py --cut 4 --batch 16 --seq 512 ;;
    fedavg-cohort) run fedavg-cohort 180 "$PY" benchmarks/fedavg_cohort.py --device cuda \
      --qwen05b --devices 8 --local-steps 2 --rounds 2 --batch 4 --seq 256 --repeats 1 ;;
    cohort-cpu) run cohort-cpu 200 "$PY" benchmarks/fedavg_cohort.py --minilm --random-base \
      --seq 40 --repeats 3 --rounds 4 --padding-free --floor ;;
    split-grpc) run split-grpc 240 "$PY" benchmarks/grpc_wire.py --random-base --steps 30 \
      --repeats 2 --big-mib 128 ;;
    *) echo "gpu_check: unknown part '$part' (tests lora-step split-mfu fedavg-cohort cohort-cpu split-grpc)" >&2
       exit 2 ;;
  esac
done
echo "== summary"
cat "$OUT/device.txt"
grep -h -E "passed|failed|cotune / PEFT|MFU|cohort / one by one|round trip:|MB/s|ratio" \
  "$OUT"/*.log
exit $status
