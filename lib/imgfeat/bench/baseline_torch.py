"""The PyTorch baseline: a plain single-process script, as users write it for a torch backbone.

A ``Dataset`` opens each file with Pillow (RGB, bilinear resize), a ``DataLoader`` with one worker process per
core batches it, and the same frozen architecture (seeded weights) runs on each batch under ``inference_mode``.
Run as ``python -m imgfeat.bench.baseline_torch --list FILES.txt --model efficientnet_lite0 --out X.npy``; it prints
one JSON line with its own timings. The process's whole wall time is measured by the caller.
"""

from __future__ import annotations

import os
import time

from imgfeat.bench.baseline import parse_args, save_and_report


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv, "efficientnet_lite0")
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from PIL import Image

    from imgfeat.backbones.registry import get_backbone
    from imgfeat.engines import torch_models

    backbone = get_backbone(a.model)
    size = backbone.input_size
    with open(a.list, encoding="utf-8") as fh:
        files = [line.strip() for line in fh if line.strip()]
    mean = torch.tensor(backbone.mean).view(3, 1, 1)
    std = torch.tensor(backbone.std).view(3, 1, 1)

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int) -> torch.Tensor:
            img = Image.open(files[i]).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
            return (x - mean) / std

    torch.manual_seed(42)
    model = torch_models.build(backbone.constructor, size).eval()
    loader = torch.utils.data.DataLoader(Images(), batch_size=a.batch_size, num_workers=os.cpu_count() or 1)
    t_model = time.perf_counter()
    with torch.inference_mode():
        return save_and_report(a.out, [model(x).numpy() for x in loader], t0, t_model)


if __name__ == "__main__":
    raise SystemExit(main())
