#!/usr/bin/env bash
# Side-by-side throughput: philo vs the Python reference stack (PyTorch + transformers, PEFT +
# bitsandbytes for training) on the same random Phi-3-mini-shaped model and the same shapes.
# Meant to run ON the GPU machine, from the repository root:
#
#   scripts/bench-compare.sh [PHILO_BINARY]
#
# PHILO_BINARY defaults to $PHILO, else .bin/philo, else .bin/philo.gz unpacked to /tmp/philo.
# Wheels in .whl/ (bitsandbytes: the GPU machine has none and no network) are installed into
# /tmp/site first and put on PYTHONPATH.
#
# Environment (defaults in brackets):
#   TASKS="prefill decode train"   which tasks to run
#   REF=1                          0: skip the reference (philo only)
#   RUN_PHILO=1                    0: skip philo (reference only)
#   PREFILL_BATCH=1 PREFILL_SEQ=2048
#   DECODE_BATCHES="1" DECODE_SEQ=128 DECODE_NEW=128     e.g. DECODE_BATCHES="1 26"
#   TRAIN_BATCH=12 TRAIN_SEQ=2048 TRAIN_RANK=64 TRAIN_ALPHA=128 TRAIN_QUANT=nf4
#   TRAIN_STEPS=4 TRAIN_WARMUP=1    reference only (philo uses its own defaults)
#   PHILO_ARGS=""                  extra arguments for every philo bench command
#   REF_ARGS=""                    extra arguments for every reference command
#   TIMEOUT=0                      seconds per single run (0: no limit)
#   OUT                            when set: $OUT/bench.jsonl (all results) and $OUT/bench-logs/
set -u
cd "$(dirname "$0")/.." || exit 1

export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

TASKS=${TASKS:-prefill decode train}
REF=${REF:-1}
RUN_PHILO=${RUN_PHILO:-1}
PREFILL_BATCH=${PREFILL_BATCH:-1}
PREFILL_SEQ=${PREFILL_SEQ:-2048}
DECODE_BATCHES=${DECODE_BATCHES:-1}
DECODE_SEQ=${DECODE_SEQ:-128}
DECODE_NEW=${DECODE_NEW:-128}
TRAIN_BATCH=${TRAIN_BATCH:-12}
TRAIN_SEQ=${TRAIN_SEQ:-2048}
TRAIN_RANK=${TRAIN_RANK:-64}
TRAIN_ALPHA=${TRAIN_ALPHA:-128}
TRAIN_QUANT=${TRAIN_QUANT:-nf4}
TRAIN_STEPS=${TRAIN_STEPS:-4}
TRAIN_WARMUP=${TRAIN_WARMUP:-1}
PHILO_ARGS=${PHILO_ARGS:-}
REF_ARGS=${REF_ARGS:-}
TIMEOUT=${TIMEOUT:-0}

work=$(mktemp -d /tmp/bench-compare.XXXXXX)
results="$work/bench.jsonl"
: > "$results"
logs="$work/logs"
mkdir -p "$logs"

# --- the philo binary
PHILO=${1:-${PHILO:-}}
if [ "$RUN_PHILO" != 0 ]; then
  if [ -z "$PHILO" ]; then
    if [ -x .bin/philo ]; then
      PHILO=.bin/philo
    elif [ -f .bin/philo.gz ]; then
      gunzip -c .bin/philo.gz > /tmp/philo && chmod +x /tmp/philo && PHILO=/tmp/philo
    fi
  fi
  if [ -z "$PHILO" ] || [ ! -x "$PHILO" ]; then
    echo "no philo binary (give a path, set PHILO, or put .bin/philo or .bin/philo.gz); philo runs skipped" >&2
    RUN_PHILO=0
  fi
fi

# --- the reference's missing packages (bitsandbytes), from local wheels only
if [ "$REF" != 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
  echo "installing $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into /tmp/site ..." >&2
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >&2; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "wheel install failed; the reference runs without it" >&2
  fi
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null >&2 || true
[ "$REF" = 0 ] || python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' >&2 || true

# run NAME CMD...: runs CMD with its output in $logs/NAME.log; on failure prints the log's tail.
run() {
  local name=$1; shift
  local log="$logs/$name.log" rc start
  echo "=== $name: $*" >&2
  start=$SECONDS
  if [ "$TIMEOUT" != 0 ]; then
    timeout "$TIMEOUT" "$@" > "$log" 2>&1
  else
    "$@" > "$log" 2>&1
  fi
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "--- $name FAILED (exit $rc after $((SECONDS - start)) s); last lines:" >&2
    tail -n 15 "$log" | sed 's/^/    /' >&2
    return 1
  fi
  echo "--- $name done in $((SECONDS - start)) s" >&2
  return 0
}

# philo_collect FILE: philo's --json array -> one line per object, tagged stack=philo.
philo_collect() {
  python3 - "$1" >> "$results" <<'PY' || echo "--- could not read $1" >&2
import json, sys
data = json.load(open(sys.argv[1]))
for row in data if isinstance(data, list) else [data]:
    row = dict(row, stack="philo")
    print(json.dumps(row))
PY
}

# ref_collect LOG: the last JSON line of the reference's stdout+stderr.
ref_collect() {
  local line
  line=$(grep '^{' "$1" | tail -n 1)
  if [ -n "$line" ]; then echo "$line" >> "$results"; else echo "--- no JSON line in $1" >&2; fi
}

philo_run() {  # philo_run NAME ARGS... (the bench args, without --json)
  local name=$1; shift
  local json="$work/$name.json"
  # shellcheck disable=SC2086
  run "$name" "$PHILO" bench "$@" --json "$json" $PHILO_ARGS && philo_collect "$json"
}

ref_run() {  # ref_run NAME ARGS...
  local name=$1; shift
  # shellcheck disable=SC2086
  run "$name" python3 scripts/bench_reference.py "$@" $REF_ARGS && ref_collect "$logs/$name.log"
}

for task in $TASKS; do
  case $task in
    prefill)
      [ "$RUN_PHILO" = 0 ] || philo_run philo-prefill prefill --random --seq "$PREFILL_SEQ" --batch "$PREFILL_BATCH"
      [ "$REF" = 0 ] || ref_run ref-prefill prefill --seq "$PREFILL_SEQ" --batch "$PREFILL_BATCH"
      ;;
    decode)
      if [ "$RUN_PHILO" != 0 ]; then
        batch_flags=()
        for b in $DECODE_BATCHES; do batch_flags+=(--batch "$b"); done
        philo_run philo-decode decode --random --seq "$DECODE_SEQ" --new_tokens "$DECODE_NEW" "${batch_flags[@]}"
      fi
      if [ "$REF" != 0 ]; then
        for b in $DECODE_BATCHES; do
          ref_run "ref-decode-b$b" decode --seq "$DECODE_SEQ" --new_tokens "$DECODE_NEW" --batch "$b"
        done
      fi
      ;;
    train)
      [ "$RUN_PHILO" = 0 ] || philo_run philo-train train --random --batch "$TRAIN_BATCH" --seq "$TRAIN_SEQ" \
        --rank "$TRAIN_RANK" --quant "$TRAIN_QUANT"
      [ "$REF" = 0 ] || ref_run ref-train train --batch "$TRAIN_BATCH" --seq "$TRAIN_SEQ" --rank "$TRAIN_RANK" \
        --alpha "$TRAIN_ALPHA" --quant "$TRAIN_QUANT" --steps "$TRAIN_STEPS" --warmup "$TRAIN_WARMUP"
      ;;
    *) echo "unknown task '$task' (prefill, decode, train)" >&2 ;;
  esac
done

echo >&2
echo "raw results:" >&2
cat "$results" >&2
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/bench-logs"
  cat "$results" >> "$OUT/bench.jsonl"
  cp "$logs"/*.log "$OUT/bench-logs/" 2>/dev/null || true
fi

echo
TRAIN_QUANT=$TRAIN_QUANT TRAIN_RANK=$TRAIN_RANK DECODE_NEW=$DECODE_NEW python3 - "$results" <<'PY'
import json, os, sys

rows = []
for line in open(sys.argv[1]):
    line = line.strip()
    if line:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass

def key(r):
    # philo names its training rows train-qlora / train-lora; the reference says train.
    task = r.get("task") or ""
    return ("train" if task.startswith("train") else task, r.get("batch"), r.get("seq"))

def shape(task, batch, seq):
    if task == "decode":
        return f"batch {batch}, prompt {seq} + {os.environ['DECODE_NEW']} new"
    if task == "train":
        return f"batch {batch} x {seq}, r{os.environ['TRAIN_RANK']} {os.environ['TRAIN_QUANT']}"
    return f"batch {batch} x {seq}"

def num(x, fmt):
    return "-" if x is None else format(x, fmt)

found = {}
for r in rows:
    found.setdefault(key(r), {})[r.get("stack", "?")] = r  # the last of each wins
order = {"prefill": 0, "decode": 1, "train": 2}
print("| task | shape | philo tok/s | reference tok/s | ratio | philo peak GiB | reference peak GiB |")
print("|---|---|---:|---:|---:|---:|---:|")
for k in sorted(found, key=lambda k: (order.get(k[0], 9), k[1] or 0, k[2] or 0)):
    p = found[k].get("philo", {})
    q = found[k].get("transformers", {})
    pt, qt = p.get("tokens_per_second"), q.get("tokens_per_second")
    ratio = f"{pt / qt:.2f}x" if pt and qt else "-"
    print(f"| {k[0]} | {shape(*k)} | {num(pt, '.1f')} | {num(qt, '.1f')} | {ratio} | "
          f"{num(p.get('peak_memory_gib'), '.2f')} | {num(q.get('peak_memory_gib'), '.2f')} |")
if not found:
    print("| (no results) | | | | | | |")
for k in found:
    p, q = found[k].get("philo"), found[k].get("transformers")
    if p and q and (p.get("layers"), p.get("dtype")) != (q.get("layers"), q.get("dtype")):
        print(f"\nnote: {k[0]} batch {k[1]} seq {k[2]}: philo ran {p.get('layers')} layers in "
              f"{p.get('dtype')}, the reference {q.get('layers')} layers in {q.get('dtype')}")
print()
print("ratio = philo / reference (above 1: philo is faster). Reference peak = "
      "torch.cuda.max_memory_allocated of the whole process.")
PY
echo "logs: $logs" >&2
