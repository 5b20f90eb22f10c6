#!/usr/bin/env bash
# The training-speed acceptance runs on the GPU machine, from the repository root
# (docs/training-speed.md has the results). Binaries are plain or .xz files.
#
#   scripts/train-acceptance.sh speed PHILO     # GPU tests, profile, bench train (with and
#                                               # without dropout), attention beside torch's
#                                               # SDPA, the peers in .peers (../shared/peers
#                                               # copied), and the seed's finetune command on a
#                                               # full-size checkpoint
#   scripts/train-acceptance.sh parity PHILO OLD_PHILO
#                                               # 30 steps at 12 × 2048 with two builds, per-step
#                                               # losses compared
# Set TESTS=DIR (a folder with the kernels-cuda-test and hf-parity-test binaries) to run the GPU
# tests too.
set -u
mode=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
SECONDS=0
unpack() { case $1 in *.xz) xz -dc "$1" > "/tmp/$2"; chmod +x "/tmp/$2"; echo "/tmp/$2";; *) echo "$1";; esac; }
philo=$(unpack "$2" philo-under-test)

if [ "$mode" = speed ]; then
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader
  if [ -n "${TESTS:-}" ]; then
    echo "== GPU tests [${SECONDS}s]"
    PHILO_CUDA_TESTS=1 "$(unpack "$TESTS/kernels-cuda-test.xz" kt)" 2>&1 | grep -E "test result|panicked"
    PHILO_HF_FIXTURES=$repo/tests/fixtures/hf-reference PHILO_CUDA_TESTS=1 \
      "$(unpack "$TESTS/hf-parity-test.xz" ht)" hf_reference_cases_on_cuda_bf16 --nocapture 2>&1 | grep -E "packed|test result|panicked"
  fi
  echo "== profile QLoRA b12 [${SECONDS}s]"
  PHILO_PROFILE=1 "$philo" bench train --random --batch 12 --seq 2048 --rank 64 --quant nf4 --steps 1 2>&1 | grep "\[profile\]" | tail -34
  echo "== bench train [${SECONDS}s]"
  for args in "--batch 12 --quant nf4" "--batch 12 --quant nf4 --lora_dropout 0" "--batch 1 --quant nf4" "--batch 12 --quant none" "--batch 12 --quant none --uncheckpointed_layers 24"; do
    echo "$args"
    "$philo" bench train --random --seq 2048 --rank 64 $args 2>&1 | grep -E "^train|rror"
  done
  echo "== attention: philo, then torch's SDPA [${SECONDS}s]"
  "$philo" bench attention --batch 4 --batch 12 2>&1 | grep -E "^attention|rror"
  python3 "$repo/scripts/bench_kernels_torch.py" --batch 4 2>&1 | grep -i sdpa
  echo "== peers [${SECONDS}s]"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$repo"/.peers/wheels/*.whl 2>&1 | tail -2
  PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 "$repo/.peers/train_peers.py" hf liger unsloth 2>&1 | grep '^{'
  echo "== the seed's command on a full-size checkpoint [${SECONDS}s]"
  [ -f /tmp/phi3/config.json ] || python3 "$repo/scripts/write_random_phi3.py" /tmp/phi3 2>&1 | tail -1
  python3 "$repo/scripts/long_chat_dataset.py" /tmp/data.json --examples 288
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 > "$out/util.csv" &
  sampler=$!
  rm -rf /tmp/run && mkdir -p /tmp/run && cd /tmp/run
  "$philo" finetune --base_model /tmp/phi3 --dataset /tmp/data.json --batch_size 12 --gradient_accumulation_steps 4 --lora_r 64 --lora_alpha 128 --lr 2e-4 --max_seq_length 2048 2>&1 | tr '\r' '\n' | grep -v "^ *$" | tail -6
  kill $sampler
  cat philo-output/metrics.jsonl
  python3 - "$out/util.csv" <<'PY'
import sys
u = [float(l.split(",")[1]) for l in open(sys.argv[1]) if l.count(",") == 2]
busy = [i for i, x in enumerate(u) if x >= 50]
if busy:
    w = u[busy[0]:busy[-1] + 1]
    print(f"utilization over the training window: {len(w)} samples, mean {sum(w)/len(w):.1f} %, "
          f"{100*sum(x >= 90 for x in w)/len(w):.1f} % of samples >= 90 %, min {min(w):.0f} %")
PY
elif [ "$mode" = parity ]; then
  old=$(unpack "$3" philo-old)
  [ -f /tmp/phi3/config.json ] || python3 "$repo/scripts/write_random_phi3.py" /tmp/phi3 2>&1 | tail -1
  python3 "$repo/scripts/long_chat_dataset.py" /tmp/data30.json --examples 360 --seed 1
  for v in old new; do
    bin=$philo; [ $v = old ] && bin=$old
    echo "== $v [${SECONDS}s]"
    rm -rf "/tmp/run-$v"
    "$bin" finetune --base_model /tmp/phi3 --dataset /tmp/data30.json --batch_size 12 --gradient_accumulation_steps 1 --lora_r 64 --lora_alpha 128 --lr 2e-4 --max_seq_length 2048 --max_steps 30 --logging_steps 1 --output_dir "/tmp/run-$v" 2>&1 | tr '\r' '\n' | grep -iE "error" | tail -3
    cp "/tmp/run-$v/metrics.jsonl" "$out/metrics-$v.jsonl"
  done
  python3 - "$out" <<'PY'
import json, sys
old = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics-old.jsonl")]
new = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics-new.jsonl")]
rel = [abs(n["loss"] - o["loss"]) / o["loss"] for o, n in zip(old, new)]
print("step  old loss   new loss   rel diff")
for o, n, r in zip(old, new, rel):
    print(f"{o['step']:4d}  {o['loss']:.5f}  {n['loss']:.5f}  {r:.2e}")
print(f"mean relative difference {sum(rel)/len(rel):.3e}, max {max(rel):.3e} over {len(rel)} steps")
print(f"tokens/s (last step): old {old[-1]['tokens_per_second']:.0f}, new {new[-1]['tokens_per_second']:.0f}")
PY
else
  echo "usage: $0 speed PHILO | parity PHILO OLD_PHILO" >&2
  exit 2
fi
echo "[${SECONDS}s]"
