"""How far apart perceptual hashes of distinct X-rays and of near copies are, at 64 and 256 bits.

    .venv/bin/python bench/phash_separation.py [../shared/data/kermany224] [1500]

For every third image (up to N): the distance to its nearest other image, and to a copy of itself re-encoded
at JPEG quality 70, resized to 200 px and brightened 4 % (for 200 of them). docs/validity.md has the numbers.
"""

from __future__ import annotations

import glob
import io
import os
import sys

import imagehash
import numpy as np
from PIL import Image, ImageEnhance


def bits(img: Image.Image, hash_size: int) -> np.ndarray:
    return np.asarray(imagehash.phash(img.convert("L"), hash_size=hash_size).hash).flatten()


def near_copy(path: str) -> Image.Image:
    img = ImageEnhance.Brightness(Image.open(path).convert("L").resize((200, 200))).enhance(1.04)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70)
    return Image.open(io.BytesIO(buf.getvalue()))


def main() -> int:
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join("..", "shared", "data", "kermany224")
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
    files = sorted(glob.glob(os.path.join(root, "**", "*.jp*g"), recursive=True))[::3][:limit]
    for hash_size in (8, 16):
        hashes = np.stack([bits(Image.open(f), hash_size) for f in files])
        distances = (hashes[:, None, :] != hashes[None, :, :]).sum(axis=2)
        np.fill_diagonal(distances, 10**6)
        nearest = distances.min(axis=1)
        copies = [int((bits(near_copy(f), hash_size) != hashes[i]).sum()) for i, f in enumerate(files[:200])]
        print(f"{hash_size * hash_size} bits, {len(files)} images: nearest distinct image min {nearest.min()}, "
              f"1/5/50 % {np.percentile(nearest, [1, 5, 50]).tolist()}; near copies max {max(copies)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
