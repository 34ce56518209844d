"""What each image costs the host CPU in a featurizing task, per stage, on one core: to size tasks per GPU.

With nvJPEG the GPU decodes and resizes; the host still reads the header, hashes the bytes (SHA-256, exact
duplicates) and hashes the decoded pixels (pHash, near duplicates). With Pillow it also decodes and resizes.
Prints milliseconds per image and the images/s one core sustains for each path.

    python bench/host_costs.py --input ../shared/data/kermany224/test --limit 300
    python bench/host_costs.py --input ../shared/data/kermany_full --limit 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from imgfeat.bench.run import list_images
from imgfeat.engines.torch_jpeg import device_header
from imgfeat.io.decoders import DecodeOptions, decode_file
from imgfeat.io.fingerprints import perceptual_hash


def per_image_ms(fn, items) -> float:
    started = time.perf_counter()
    for item in items:
        fn(item)
    return 1000 * (time.perf_counter() - started) / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    a = parser.parse_args()
    files = list_images(a.input)[: a.limit]
    blobs = [Path(f).read_bytes() for f in files]
    options = DecodeOptions(size=a.size)
    decoded = [decode_file(b, options)[0].array for b in blobs]
    stages = {
        "header (Pillow, lazy)": per_image_ms(lambda b: device_header(b, options), blobs),
        "sha256 of the bytes": per_image_ms(lambda b: hashlib.sha256(b).hexdigest(), blobs),
        "phash of the decoded image": per_image_ms(perceptual_hash, decoded),
        "Pillow decode + resize": per_image_ms(lambda b: decode_file(b, options), blobs),
        "uint8 batch assembly": per_image_ms(lambda x: np.ascontiguousarray(x[None]), decoded),
    }
    device_share = stages["header (Pillow, lazy)"] + stages["sha256 of the bytes"] + stages["phash of the decoded image"]
    pillow_path = device_share + stages["Pillow decode + resize"] - stages["header (Pillow, lazy)"]
    result = {
        "images": len(blobs), "mean_file_kb": round(sum(map(len, blobs)) / len(blobs) / 1024, 1),
        "ms_per_image": {k: round(v, 3) for k, v in stages.items()},
        "one_core_images_per_s": {"nvjpeg path (host share)": round(1000 / device_share, 1),
                                  "pillow path": round(1000 / pillow_path, 1)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
