#!/usr/bin/env bash
# The benchmark suite at its real sizes on the GPU host, then the tables and plot of docs/performance.md.
#
# Run from the repository root after the GPU host's install line has put the checkout and its
# dependencies on PYTHONPATH. Results go to $OUT (default ./bench-out): bench.json (pytest-benchmark)
# and bench.log; docs/performance.md (between its results markers) and docs/performance.png are
# rewritten. The run is planned to take under 8 minutes on an H100: after BENCH_BUDGET_S seconds
# (default 420) the remaining benchmarks are skipped and reported as such.
# Extra arguments go to pytest (e.g. -k "dense or online").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-./bench-out}"
mkdir -p "$OUT"
rm -f "$OUT/bench.json"  # never render a previous run's results
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export PYTHONUNBUFFERED=1

start=$(date +%s)
python3 -m pytest benchmarks --gpu --benchmark-json="$OUT/bench.json" -q "$@" 2>&1 | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
echo "# pytest exit status $status after $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.log"

if [ -s "$OUT/bench.json" ]; then
    # render whatever was measured, even when some benchmark failed
    python3 ci/render_performance.py "$OUT/bench.json" --out docs/performance.md --plot docs/performance.png \
        || { [ "$status" -eq 0 ] && status=1; }
else
    echo "no $OUT/bench.json: nothing to render" >&2
    [ "$status" -eq 0 ] && status=1
fi
exit "$status"
