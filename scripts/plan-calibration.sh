#!/usr/bin/env bash
# The calibration grid of philo-plan (docs/plan.md), on the GPU machine from the repository root:
#   scripts/plan-calibration.sh PHILO > calib.txt && python3 scripts/plan_fit.py calib.txt
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
philo=${1:?usage: scripts/plan-calibration.sh PHILO_BINARY}
case $philo in *.xz) xz -dc "$philo" > /tmp/philo-plan && chmod +x /tmp/philo-plan; philo=/tmp/philo-plan;; esac
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
SECONDS=0
run() { # label, args...
  label=$1; shift
  line=$("$philo" bench train --random --steps 2 "$@" 2>&1 | grep -E "^train|rror" | head -3)
  echo "$label | $* | $line | ${SECONDS}s"
}
run q-b1-s512   --batch 1 --seq 512 --rank 64
run q-b1-s2048  --batch 1 --seq 2048 --rank 64
run q-b4-s2048  --batch 4 --seq 2048 --rank 64
run q-b12-s2048 --batch 12 --seq 2048 --rank 64
run q-b1-s4096  --batch 1 --seq 4096 --rank 64
run q-b4-s4096  --batch 4 --seq 4096 --rank 64
run q-b12-s4096 --batch 12 --seq 4096 --rank 64
run q-b4-s512   --batch 4 --seq 512 --rank 64
run q-b12-s512  --batch 12 --seq 512 --rank 64
run q-b12-s2048-r8 --batch 12 --seq 2048 --rank 8
run q-b1-s2048-r8  --batch 1 --seq 2048 --rank 8
run q-b4-s4096-r8  --batch 4 --seq 4096 --rank 8
run l-b1-s2048  --batch 1 --seq 2048 --rank 64 --quant none
run l-b4-s2048  --batch 4 --seq 2048 --rank 64 --quant none
run l-b12-s2048 --batch 12 --seq 2048 --rank 64 --quant none
run l-b4-s4096-r8 --batch 4 --seq 4096 --rank 8 --quant none
run q-b4-s2048-nooff --batch 4 --seq 2048 --rank 64 --no_gradient_offload
run q-b2-s1024 --batch 2 --seq 1024 --rank 16
echo "== decode / prefill peaks"
"$philo" bench decode --random --batch 1 --seq 2048 --new_tokens 64 2>&1 | grep -E "^decode|rror"
"$philo" bench decode --random --batch 1 --seq 2048 --new_tokens 64 --quant nf4 2>&1 | grep -E "^decode|rror"
"$philo" bench prefill --random --batch 1 --seq 2048 2>&1 | grep -E "^prefill|rror"
echo "done ${SECONDS}s"
