#!/usr/bin/env bash
# The serving and speculative-decoding measurements on the GPU machine, in one call, from the
# repository root (PHILO is a binary or a .xz of one):
#
#   scripts/serve-acceptance.sh PHILO
#
# On a full-size random Phi-3-mini checkpoint with a random r-64 adapter and a 4-layer draft of
# the same family (scripts/write_random_phi3.py): the engine in-process at 26, 64 and 256
# greedy streams (128 + 128 tokens), speculative decoding at batch 1 (prompt lookup, and the
# draft in bf16 and with an int4 base, each against plain decoding, with the verify step's
# cost curve), then `philo serve` with the adapter loaded by `philo bench serve --http` at 64
# streams, sampled, every second request on the adapter (equal and varied lengths).
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
SECONDS=0
case $1 in
  *.xz) xz -dc "$1" > /tmp/philo-serve-test && chmod +x /tmp/philo-serve-test && philo=/tmp/philo-serve-test ;;
  *) philo=$1 ;;
esac
model=/tmp/phi3-serve draft=/tmp/phi3-draft adapter=/tmp/phi3-serve-adapter
[ -f $model/config.json ] || python3 "$repo/scripts/write_random_phi3.py" $model --adapter $adapter 2>&1 | tail -2
[ -f $draft/config.json ] || python3 "$repo/scripts/write_random_phi3.py" $draft --layers 4 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader

echo "== bench serve: the engine in-process, greedy, 128 + 128 tokens [${SECONDS}s]"
"$philo" bench serve --model $model --batch 26 --batch 64 --batch 256 --seq 128 --new_tokens 128 2>&1 | grep -E "^serve|rror"

echo "== speculative decoding, batch 1, 128 + 128 tokens [${SECONDS}s]"
for args in "--speculative ngram" "--speculative draft --draft_model $draft" \
            "--quant int4 --speculative draft --draft_model $draft"; do
  echo "$args"
  "$philo" bench decode --model $model --seq 128 --new_tokens 128 $args 2>&1 | grep -E "^speculative|^verify|rror"
done

echo "== HTTP: 64 streams, temperature 0.7, top_p 0.9, every second request on the adapter [${SECONDS}s]"
port=8123
"$philo" serve --model $model --adapter tuned=$adapter --port $port > /tmp/serve.log 2>&1 &
server=$!
for _ in $(seq 120); do
  python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health')" 2>/dev/null && break
  sleep 1
done
grep -iE "kv|cache|listening" /tmp/serve.log | head -3
# A warm-up run first: a fresh process loads (and the driver compiles) its kernels on first use.
"$philo" bench serve --http http://127.0.0.1:$port/v1 --batch 64 --requests 128 --adapter tuned \
  --seq 128 --new_tokens 16 > /dev/null 2>&1
# Equal lengths (streams finish in waves), then lengths varied so that requests join one by one.
for lengths in "" "--varied_lengths"; do
  "$philo" bench serve --http http://127.0.0.1:$port/v1 --batch 64 --requests 256 --adapter tuned \
    --seq 128 --new_tokens 128 $lengths 2>&1 | grep -E "^streams|^[0-9]|rror"
done
kill $server
wait $server 2>/dev/null
echo "[${SECONDS}s]"
