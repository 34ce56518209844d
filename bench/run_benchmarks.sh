#!/usr/bin/env bash
# The benchmarks behind docs/benchmarks.md. Needs ../shared/data (real chest X-rays) and a quiet machine.
#   bash bench/run_benchmarks.sh [N] [REPEATS]      (defaults: N=2000, REPEATS=3)
# Writes one JSON per run to bench/results/ and prints each table. Takes about an hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
REPEATS=${2:-3}
DATA=${IMGFEAT_DATA:-../shared/data}
OUT=bench/results
mkdir -p "$OUT"
PY=.venv/bin/python
export PYTHONPATH=$PWD/lib PYSPARK_PYTHON=$PWD/$PY TF_CPP_MIN_LOG_LEVEL=2

bench() {  # name, then imgfeat bench arguments
  local name=$1; shift
  for r in $(seq 1 "$REPEATS"); do
    echo "== $name (run $r/$REPEATS)"
    $PY -m imgfeat.cli bench "$@" --json "$OUT/$name-$r.json"
  done
}

bench resnet50-224 --input "$DATA/kermany224/train" --model resnet50 --limit "$N"
bench resnet50-fullres --input "$DATA/kermany_fullres_200" --model resnet50 --limit "$N"
bench inception_v3-224 --input "$DATA/kermany224/train" --model inception_v3 --limit "$N"
# Memory flat as N grows: ours only, 3x the images.
REPEATS=1 bench resnet50-224-x3 --input "$DATA/kermany224/train" --model resnet50 --limit $((3 * N)) --skip-baseline
# Scaling: one task slot vs two.
REPEATS=1 bench resnet50-224-local1 --input "$DATA/kermany224/train" --model resnet50 --limit "$N" --master "local[1]" --skip-baseline
$PY bench/summarize.py "$OUT"
