#!/usr/bin/env bash
# The measurement behind chapter 7's "When one machine is not enough": writes benchmarks/scaling_2x1_cpu.txt.
#
# One meta-step (meta-gradient and all_reduce) of the Conv4 chapter 6.1 trains (bench configuration
# omniglot-chapter: 32 filters, 20-way 1-shot with 1 query per class, meta-batch 8, one inner step of 0.4,
# second order, per-task loop), timed with 2 processes x 1 thread against 1 process x 2 threads, in
# 3 alternating blocks of REPEATS timed rounds each way (python -m metabp bench --processes, metabp.scaling).
# The file records the command, the machine, the load average before and after, every block's medians,
# the ratio and the share of the step spent in communication.
#
# Run it on an otherwise idle machine: on a shared one the ratio measures the crowding (a process whose two
# threads must meet at every operation loses more to other jobs than two processes of one thread each).
#
#   benchmarks/scaling.sh                      # the measurement (REPEATS=20, WARMUP=2)
#   REPEATS=1 WARMUP=0 benchmarks/scaling.sh   # a quick check that it runs
#   OUT=/tmp/x.txt benchmarks/scaling.sh --width 8 --meta-batch-size 4   # extra options go to the bench
#
# Environment: PYTHON (default .venv/bin/python), REPEATS, WARMUP, OUT (default benchmarks/scaling_2x1_cpu.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
REPEATS=${REPEATS:-20}
WARMUP=${WARMUP:-2}
OUT=${OUT:-benchmarks/scaling_2x1_cpu.txt}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's metabp
unset OMP_NUM_THREADS MKL_NUM_THREADS                    # the bench sets each process's threads itself

load() { cut -d' ' -f1-3 /proc/loadavg | sed 's/ /, /g'; }
cores=$(nproc)
one_minute=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$one_minute" -v c="$cores" 'BEGIN { exit !(l > 0.25 * c) }'; then
    echo "scaling.sh: warning: load average $one_minute on $cores cores; the ratio will measure the crowding" >&2
fi

command=(-m metabp bench --processes 2 --threads 1 --repeats "$REPEATS" --warmup "$WARMUP" "$@")
partial=$(mktemp "${OUT}.partial.XXXXXX")
trap 'rm -f "$partial"' EXIT
began=$(date +%s)
{
    echo "# benchmarks/scaling.sh (REPEATS=$REPEATS WARMUP=$WARMUP): python ${command[*]}"
    echo "# started $(date -u '+%Y-%m-%d %H:%M:%S UTC'), git $(git describe --always --dirty 2>/dev/null || echo '?')"
    echo "load average before: $(load) ($cores cores)"
    "$PYTHON" "${command[@]}"
    echo "load average after: $(load) ($cores cores)"
    echo "# finished $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(($(date +%s) - began)) s"
} >"$partial"
mv "$partial" "$OUT"
trap - EXIT
cat "$OUT"
