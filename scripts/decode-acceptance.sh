#!/usr/bin/env bash
# The inference measurements on the GPU machine (one H200, no Rust), from the repository root,
# with a bundle built here by scripts/device-bundle.sh:
#
#   scripts/decode-acceptance.sh BUNDLE PART...    # carry BUNDLE (e.g. .bin/bundle)
#
# Each PART fits one device call (10 minutes) with one bundle; several parts go in one call
# where they fit:
#   tests    the GPU tests (kernels, decode graph incl. the persistent layers, paged, engine,
#            hf_parity) with PHILO_CUDA_TESTS=1
#   decode   batch 1, 128 + 256 tokens, bf16 / INT8 / INT4 / NF4, the launch-per-kernel graph
#            against the persistent layers (`--engine graph|layers`), ROUNDS times (default 1)
#   shapes   the same two engines on a 3,800-token prompt, 4 and 8 sequences, `bench serve` of
#            4 and 8 streams
#   verify   the verify step's cost curve (k = 1…8) in bf16 and INT4 on each engine
#   prefill  2,048-token prefill in each format
#   long     the 128k model (a random checkpoint of its config): decode at 128 / 16,384 /
#            32,768 tokens of context, prefill of 32,768
#   chat     a full-size checkpoint with an adapter: `generate --use_4bit [--adapter]`,
#            `generate --adapter --no_merge`, and `chat --use_4bit` on it
# BASELINE=DIR (a second bundle) runs the decode, shapes, verify and prefill lines with it too,
# so that a change is measured beside the build before it in the same call.
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bundle=$1
shift
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
SECONDS=0

unpack() { # unpack BUNDLE NAME -> path of the executable
  local dest
  dest=/tmp/bundle-$(echo "$1" | tr / _)-$2
  xz -dc "$1/$2.xz" > "$dest" && chmod +x "$dest"
  echo "$dest"
}
philo=$(unpack "$bundle" philo)
baseline=
[ -n "${BASELINE:-}" ] && baseline=$(unpack "$BASELINE" philo)
# The builds to compare, each with its label.
builds() { echo "head $philo"; [ -n "$baseline" ] && echo "base $baseline"; }

bench() { # bench LABEL BINARY ARGS...: the result lines of one `philo bench`
  local label=$1 binary=$2
  shift 2
  "$binary" bench "$@" 2>&1 | grep -E "^(decode|prefill|serve|speculative|verify)|rror|panic" |
    sed "s|^|$label $* :: |"
}

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader
echo "bundle $bundle: $(cat "$bundle/commit" 2>/dev/null)${baseline:+; baseline $BASELINE: $(cat "$BASELINE/commit" 2>/dev/null)}"
for part in "$@"; do
  echo "== $part [${SECONDS}s]"
  case $part in
    tests)
      # The test binaries look for tests/fixtures under the checkout they were built in.
      built_at=$(cat "$bundle/built_at")
      if [ "$built_at" != "$repo" ] && [ ! -e "$built_at" ]; then
        mkdir -p "$(dirname "$built_at")" && ln -s "$repo" "$built_at"
      fi
      for name in kernels decode_graph paged engine hf_parity; do
        exe=$(unpack "$bundle" $name)
        echo "-- $name"
        PHILO_CUDA_TESTS=1 "$exe" --test-threads 1 2>&1 |
          grep -E "^test |test result|panicked|largest|relative|FAILED|rror" | grep -v "\.\.\. ok$"
      done
      ;;
    decode)
      while read -r label binary; do
        for round in $(seq "${ROUNDS:-1}"); do
          for quant in none int8 int4 nf4; do
            for engine in graph layers; do
              bench "$label#$round" "$binary" decode --random --batch 1 --seq 128 \
                --new_tokens 256 --quant $quant --engine $engine
            done
          done
        done
      done < <(builds)
      ;;
    shapes)
      while read -r label binary; do
        for engine in graph layers; do
          bench "$label" "$binary" decode --random --batch 1 --seq 3800 --new_tokens 128 --engine $engine
          bench "$label" "$binary" decode --random --batch 4 --batch 8 --seq 128 --new_tokens 128 \
            --engine $engine
          bench "$label" "$binary" serve --random --batch 4 --batch 8 --seq 128 --new_tokens 128 \
            --engine $engine
        done
      done < <(builds)
      ;;
    verify)
      while read -r label binary; do
        for engine in graph layers; do
          for quant in none int4; do
            bench "$label" "$binary" decode --random --seq 128 --new_tokens 64 --quant $quant \
              --speculative ngram --num_speculative_tokens 8 --engine $engine
          done
        done
      done < <(builds)
      ;;
    prefill)
      while read -r label binary; do
        for quant in none int8 int4 nf4; do
          bench "$label" "$binary" prefill --random --seq 2048 --quant $quant
        done
      done < <(builds)
      ;;
    long)
      model=/tmp/phi3-128k
      [ -f $model/config.json ] ||
        python3 scripts/write_random_phi3.py $model --context 128k 2>&1 | tail -1
      for seq in 128 16384 32768; do
        bench head "$philo" decode --model $model --batch 1 --seq $seq --new_tokens 128
      done
      bench head "$philo" prefill --model $model --seq 32768
      ;;
    chat)
      model=/tmp/phi3-chat adapter=/tmp/phi3-chat-adapter
      [ -f $model/config.json ] ||
        python3 scripts/write_random_phi3.py $model --adapter $adapter 2>&1 | tail -1
      for args in "--use_4bit" "--use_4bit --adapter $adapter" "--adapter $adapter --no_merge"; do
        echo "generate $args"
        "$philo" generate --model $model $args --prompt "Hello" --max_new_tokens 256 2>&1 |
          grep -iE "tok/s|tokens/s|rror" | tail -2
      done
      echo "chat --use_4bit (two turns on stdin)"
      printf 'Hello\nTell me more\n' |
        timeout 300 "$philo" chat --model $model --use_4bit --max_new_tokens 32 2>&1 | tail -4
      ;;
    *) echo "unknown part $part (tests, decode, shapes, verify, prefill, long, chat)" ;;
  esac
done
echo "[${SECONDS}s]"
