#!/usr/bin/env bash
# Prepare what the lent GPU machine lacks (it has Python 3.12, torch, torchvision, numpy, Pillow, pandas,
# pyarrow; no network): imgfeat's hashing dependencies and PyYAML as cp312 wheels, and a subset of ../shared/data.
# Everything goes to .gpu_carry/ (git-ignored; about 60 MB, under the 64 MiB a device command carries).
#   bash bench/gpu/prepare.sh            then, with the device tool:
#   run(command="bash bench/gpu/run.sh", carry=[".gpu_carry"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.gpu_carry
data=${DATA:-../shared/data}
rm -rf "$out" && mkdir -p "$out/wheels" "$out/data/224" "$out/data/full"
.venv/bin/pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d "$out/wheels" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  ImageHash==4.3.2 PyWavelets==1.9.0 scipy==1.17.1 PyYAML==6.0.3
# 1,500 224-px JPEGs (the bench repeats the list up to --limit) and 15 full-resolution X-rays
find "$data/kermany224/test" -name '*.jpeg' | sort | head -624 | xargs -I{} cp {} "$out/data/224/"
find "$data/kermany224/train" -name '*.jpeg' | sort | awk 'NR % 6 == 0' | head -876 | xargs -I{} cp {} "$out/data/224/"
find "$data/kermany_fullres_200" -name '*.jpeg' | sort | awk 'NR % 13 == 0' | head -15 | xargs -I{} cp {} "$out/data/full/"
du -sh "$out" "$out"/*
