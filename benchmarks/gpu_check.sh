#!/usr/bin/env bash
# The paper profile on one GPU, offline, in under 8 minutes: a rehearsal of the entry notebooks and the driver on
# stand-ins in the real formats, device checks, and DiT-XL/2 training / sampling / VAE throughput. One PASS or FAIL
# line per stage, then the numbers (also in runs/gpu_check.json). Options go to benchmarks/gpu_check.py (--help).
#
#   bash benchmarks/gpu_check.sh                          # one GPU
#   bash benchmarks/gpu_check.sh --vae /path/to/sd-vae-ft-ema   # VAE rates of a real VAE folder
#   ALLOW_CPU=1 bash benchmarks/gpu_check.sh              # no GPU: every stage on the CPU at tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
