"""Image fingerprints for duplicate detection: a perceptual hash (pHash, ``imagehash``) of the decoded image.

Exact duplicates are found by the SHA-256 of the file bytes; near duplicates (re-encoded, resized, brightened
copies) by perceptual hashes a few bits apart. The hash has 256 bits (a 16 x 16 DCT), not the usual 64: at 8 x 8
all chest films look alike, and distinct X-rays fall as close to each other as re-encoded copies do (measured:
docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np

HASH_SIZE = 16  # 16 x 16 = 256 bits, 64 hex characters


def perceptual_hash(array: np.ndarray) -> str:
    """pHash (256 bits, 64 hex characters) of an (h, w, 3) image in 0..255 (uint8 or float), on its channel mean."""
    import imagehash
    from PIL import Image

    gray = array if array.dtype == np.uint8 else np.clip(array, 0, 255).astype(np.uint8)
    if gray.ndim == 3:
        # the floor of the channel mean in integers: exactly ``gray.mean(axis=2).astype(np.uint8)``, 12x faster
        # (that float64 mean over the last axis took 1.3 of the hash's 2 ms at 224 px)
        total = gray[..., 0].astype(np.uint16)
        total += gray[..., 1]
        total += gray[..., 2]
        gray = (total // 3).astype(np.uint8)
    return str(imagehash.phash(Image.fromarray(gray, "L"), hash_size=HASH_SIZE))


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes of the same length."""
    return (int(a, 16) ^ int(b, 16)).bit_count()
