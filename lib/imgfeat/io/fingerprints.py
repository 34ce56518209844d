"""Image fingerprints for duplicate detection: a perceptual hash (pHash, ``imagehash``) of the decoded image.

Exact duplicates are found by the SHA-256 of the file bytes; near duplicates (re-encoded, resized, slightly
cropped or brightened copies) by perceptual hashes a few bits apart out of 64.
"""

from __future__ import annotations

import numpy as np


def perceptual_hash(array: np.ndarray) -> str:
    """pHash (64 bits, 16 hex characters) of an (h, w, 3) float 0..255 image, computed on its luminance."""
    import imagehash
    from PIL import Image

    gray = np.clip(array, 0, 255).astype(np.uint8)
    if gray.ndim == 3:
        gray = gray.mean(axis=2).astype(np.uint8)
    return str(imagehash.phash(Image.fromarray(gray, "L")))


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes of the same length."""
    return (int(a, 16) ^ int(b, 16)).bit_count()
