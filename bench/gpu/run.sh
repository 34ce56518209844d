#!/usr/bin/env bash
# On the lent GPU machine (no Spark, Java or TensorFlow): the featurizer's per-task function on real X-rays,
# per stage, with nvJPEG or Pillow, bf16, compiled or not; one and four concurrent tasks. JSON lines to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps --target /tmp/pydeps .gpu_carry/wheels/*.whl
export PYTHONPATH=$PWD/lib:/tmp/pydeps
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
bench() {  # name, then bench.task flags
  local name=$1; shift
  timeout 150 python -m imgfeat.bench.task --model tv_resnet50 --device gpu --precision bf16 --batch-size 256 "$@" \
    --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || echo "$name failed: $(tail -3 "$OUT/$name.log")"
  tail -1 "$OUT/$name.log"
}
bench r224_nvjpeg --input .gpu_carry/data/224 --limit 12000 --jpeg-decoder nvjpeg --decode-threads 8
bench r224_pillow --input .gpu_carry/data/224 --limit 6000 --decode-threads 8
bench full_nvjpeg --input .gpu_carry/data/full --limit 3000 --jpeg-decoder nvjpeg --decode-threads 8
bench full_pillow --input .gpu_carry/data/full --limit 600 --decode-threads 8
bench r224_nvjpeg_compile --input .gpu_carry/data/224 --limit 12000 --jpeg-decoder nvjpeg --decode-threads 8 --compile
# four tasks sharing the GPU, 4 decode threads each (summed images/s = several tasks per GPU)
for i in 1 2 3 4; do
  timeout 150 python -m imgfeat.bench.task --model tv_resnet50 --device gpu --precision bf16 --batch-size 256 \
    --input .gpu_carry/data/224 --limit 6000 --jpeg-decoder nvjpeg --decode-threads 4 --threads 4 \
    --json "$OUT/shared_$i.json" > "$OUT/shared_$i.log" 2>&1 &
done
wait
python - "$OUT" <<'PY'
import glob, json, sys
rows = [json.load(open(p)) for p in sorted(glob.glob(f"{sys.argv[1]}/shared_*.json"))]
print("four tasks, summed images/s:", round(sum(r["images_per_s"] for r in rows), 1))
PY
