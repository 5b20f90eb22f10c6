#!/usr/bin/env bash
# Fuzzes `philo serve` from its own OpenAPI document with schemathesis: every operation of
# /openapi.json gets generated requests, valid and invalid, and no answer may be a 5xx
# (not_a_server_error). schemathesis's other checks run too (status codes, content types,
# headers and bodies as documented, invalid data rejected, auth, methods), except
# positive_data_acceptance: it wants every schema-valid request accepted, but some depend on
# more than the schema can say (a prompt plus max_tokens over the context, an adapter folder
# that does not exist), and philo rightly answers those 400. Responses may take as long as the
# request timeout (120 s; schemathesis 4.x fails those over 10 s by default): a debug build on
# the CPU takes longer than 10 s to write n = 4 answers to the end of the tiny model's context,
# which says nothing about correctness.
#
#   scripts/schemathesis.sh [extra schemathesis run arguments]
#
# It writes a tiny random model (`philo new-tiny`) to a temporary folder, starts `philo serve`
# on it on 127.0.0.1, installs schemathesis into a virtual environment with pip, runs
# `schemathesis run http://127.0.0.1:PORT/openapi.json`, stops the server and exits with
# schemathesis's status. On a failure it prints the end of the server's log; the reports
# (JUnit XML, NDJSON events with every request and response) stay in $REPORT_DIR.
#
# Environment:
#   PHILO         the philo binary (default: `cargo build`, then target/debug/philo)
#   PORT          port to serve on (default: a free one)
#   MAX_EXAMPLES  test cases per API operation (default 50)
#   CHECKS        schemathesis checks (default all; CHECKS=not_a_server_error for "no 5xx" alone)
#   EXCLUDE_CHECKS  checks left out (default positive_data_acceptance; empty for none)
#   SEED          schemathesis's random seed (default: random; printed in its output)
#   VENV          where schemathesis is installed (default target/schemathesis-venv, reused)
#   SCHEMATHESIS  the pip requirement (default: schemathesis)
#   REPORT_DIR    where the reports go (default target/schemathesis-report)
#
# The server's KV cache is kept tiny (--kv-cache-gib 0.002: 32 blocks of 16 tokens), which makes
# the context 512 tokens: generated requests may ask for up to that many tokens, and each stays
# fast on the CPU.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

max_examples="${MAX_EXAMPLES:-50}"
checks="${CHECKS:-all}"
exclude_checks="${EXCLUDE_CHECKS-positive_data_acceptance}"
venv="${VENV:-$root/target/schemathesis-venv}"
report_dir="${REPORT_DIR:-$root/target/schemathesis-report}"
requirement="${SCHEMATHESIS:-schemathesis}"

if [[ -z "${PHILO:-}" ]]; then
    echo "schemathesis.sh: building philo" >&2
    cargo build --quiet --bin philo
    PHILO="$root/target/debug/philo"
fi
[[ -x "$PHILO" ]] || { echo "schemathesis.sh: $PHILO is not an executable" >&2; exit 2; }
# The server starts from a temporary folder: a relative path would not reach the binary there.
PHILO="$(realpath "$PHILO")"

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

if [[ -z "${PORT:-}" ]]; then
    PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

"$PHILO" new-tiny "$work/model" >/dev/null
(cd "$work" && HF_HUB_OFFLINE=1 exec "$PHILO" serve --model "$work/model" \
    --served-model-name philo-tiny --host 127.0.0.1 --port "$PORT" --kv-cache-gib 0.002 \
    >"$work/serve.log" 2>&1) &
server_pid=$!

base="http://127.0.0.1:$PORT"
for i in $(seq 600); do
    if curl -fsS "$base/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "schemathesis.sh: philo serve exited:" >&2
        cat "$work/serve.log" >&2
        exit 2
    fi
    if [[ "$i" == 600 ]]; then
        echo "schemathesis.sh: philo serve did not answer /health in 60 s:" >&2
        cat "$work/serve.log" >&2
        exit 2
    fi
    sleep 0.1
done
echo "schemathesis.sh: $(head -n 1 "$work/serve.log")" >&2

if [[ ! -x "$venv/bin/schemathesis" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check --quiet "$requirement"
fi
st="$venv/bin/schemathesis"
echo "schemathesis.sh: $("$st" --version)" >&2

# The option was --hypothesis-max-examples before schemathesis 4.
run_help="$("$st" run --help)"
if grep -q -- '--max-examples' <<<"$run_help"; then
    examples_flag="--max-examples"
else
    examples_flag="--hypothesis-max-examples"
fi
args=(run "$base/openapi.json" --checks "$checks" "$examples_flag" "$max_examples"
      --request-timeout 120)
if grep -q -- '--max-response-time' <<<"$run_help"; then
    args+=(--max-response-time 120)
fi
if [[ -n "$exclude_checks" ]]; then
    args+=(--exclude-checks "$exclude_checks")
fi
if [[ -n "${SEED:-}" ]]; then
    args+=(--seed "$SEED")
fi
if grep -q -- '--report-dir' <<<"$run_help"; then
    mkdir -p "$report_dir"
    args+=(--report junit,ndjson --report-dir "$report_dir")
fi

# Run in the temporary folder: hypothesis and schemathesis keep caches in the working directory.
status=0
(cd "$work" && "$st" "${args[@]}" "$@") || status=$?

if [[ "$status" != 0 ]]; then
    echo "schemathesis.sh: schemathesis exited $status; the end of the server's log:" >&2
    tail -n 50 "$work/serve.log" >&2
    [[ -d "$report_dir" ]] && echo "schemathesis.sh: reports in $report_dir" >&2
fi
if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "schemathesis.sh: philo serve died during the run:" >&2
    tail -n 50 "$work/serve.log" >&2
    status=1
fi
exit "$status"
