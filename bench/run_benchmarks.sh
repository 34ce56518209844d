#!/usr/bin/env bash
# The benchmarks behind docs/benchmarks.md. Needs ../shared/data (real chest X-rays) and a quiet machine.
#   bash bench/run_benchmarks.sh [N] [REPEATS]      (defaults: N=2000, REPEATS=3)
#   BENCHES="ratios standalone" bash bench/run_benchmarks.sh 2000 3   (only some groups)
# Writes one JSON per run to bench/results/ and prints each table. Takes about 1.5 hours on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
REPEATS=${2:-3}
DATA=${IMGFEAT_DATA:-../shared/data}
OUT=bench/results
mkdir -p "$OUT" "$OUT/standalone"
PY=.venv/bin/python
export PYTHONPATH=$PWD/lib PYSPARK_PYTHON=$PWD/$PY TF_CPP_MIN_LOG_LEVEL=2

# BENCHES: which groups to run (default all): ratios memory scaling standalone
BENCHES=${BENCHES:-"ratios memory scaling standalone"}
want() { [[ " $BENCHES " == *" $1 "* ]]; }

bench() {  # name, then imgfeat bench arguments
  local name=$1; shift
  for r in $(seq 1 "$REPEATS"); do
    echo "== $name (run $r/$REPEATS)"
    $PY -m imgfeat.cli bench "$@" --json "$OUT/$name-$r.json"
  done
}

if want ratios; then
  bench resnet50-224 --input "$DATA/kermany224/train" --model resnet50 --limit "$N"
  bench resnet50-fullres --input "$DATA/kermany_fullres_200" --model resnet50 --limit "$N"
  bench inception_v3-224 --input "$DATA/kermany224/train" --model inception_v3 --limit "$N"
fi
# Memory flat as N grows: ours only, 3x the images.
want memory && REPEATS=1 bench resnet50-224-x3 --input "$DATA/kermany224/train" --model resnet50 --limit $((3 * N)) --skip-baseline
# Scaling: one task slot vs two.
want scaling && REPEATS=1 bench resnet50-224-local1 --input "$DATA/kermany224/train" --model resnet50 --limit "$N" --master "local[1]" --skip-baseline
# Scaling: a standalone cluster on 127.0.0.1 with one, then two workers (1 core each).
want standalone && $PY bench/standalone_scaling.py --input "$DATA/kermany224/train" --limit "$N" --json "$OUT/standalone/standalone.json"
$PY bench/summarize.py "$OUT"
