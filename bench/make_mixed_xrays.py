"""Build a folder of real X-rays in the mixed kinds users have, plus broken files.

    python bench/make_mixed_xrays.py ../shared/data/kermany_fullres_200 /tmp/mixed_xrays

Every 5th image stays a JPEG; the others become RGB PNG, RGBA PNG, 16-bit grayscale PNG (12-bit data)
and palette PNG; one is upscaled to 4,100 x 4,100 px; then one broken file of every kind is added.
Prints the expected counts. The source folder is only read.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
from PIL import Image

from imgfeat.demo.samples import BAD_FILES, bad_file_bytes


def main(src: str, dst: str) -> int:
    kinds = ["jpeg", "rgb_png", "rgba_png", "gray16_png", "palette_png"]
    n = 0
    for cls in sorted(os.listdir(src)):
        folder = os.path.join(src, cls)
        if not os.path.isdir(folder):
            continue
        os.makedirs(os.path.join(dst, cls), exist_ok=True)
        for i, name in enumerate(sorted(os.listdir(folder))):
            path = os.path.join(folder, name)
            stem = os.path.splitext(name)[0]
            kind = kinds[i % len(kinds)]
            out = os.path.join(dst, cls, f"{stem}_{kind}")
            if kind == "jpeg":
                shutil.copyfile(path, out + ".jpeg")
            else:
                img = Image.open(path)
                gray = img.convert("L")
                if kind == "rgb_png":
                    gray.convert("RGB").save(out + ".png")
                elif kind == "rgba_png":
                    gray.convert("RGBA").save(out + ".png")
                elif kind == "gray16_png":
                    arr = (np.asarray(gray, dtype=np.float32) / 255.0 * 4095).astype(np.uint16)
                    Image.fromarray(arr).save(out + ".png")
                else:
                    gray.convert("P").save(out + ".png")
            n += 1
        if cls == sorted(os.listdir(src))[0]:
            first = sorted(os.listdir(folder))[0]
            Image.open(os.path.join(folder, first)).convert("L").resize((4100, 4100)).save(
                os.path.join(dst, cls, "upscaled_4100px.jpg"), quality=90
            )
            n += 1
            for bad in BAD_FILES:
                with open(os.path.join(dst, cls, f"broken_{bad}"), "wb") as fh:
                    fh.write(bad_file_bytes(bad))
    print(f"{dst}: {n} valid images, {len(BAD_FILES)} broken files ({', '.join(BAD_FILES.values())})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
