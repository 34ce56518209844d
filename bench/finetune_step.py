"""The bare training step of a backbone + linear head, without Spark or imgfeat's data path (docs/finetuning.md).

In-memory random uint8 batches, the same model, trainable layers, optimizer and precision as ``imgfeat finetune``;
prints images/s. Compare it with the ``train_images_per_s`` that ``imgfeat finetune`` logs per epoch.

    python bench/finetune_step.py --model efficientnet_lite0 --train-layers last:3 --batch-size 32 --steps 20 [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    import numpy as np
    import torch

    from imgfeat.backbones.registry import get_backbone
    from imgfeat.engines import resolve_weights
    from imgfeat.finetune.loop import LoopSpec, build_network, set_trainable

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--train-layers", default="last:3")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    b = get_backbone(a.model)
    source = resolve_weights(b, a.weights)
    spec = LoopSpec(files=[], labels=["a", "b"], architecture=b.constructor, input_size=b.input_size, feature_dim=b.feature_dim,
                    mean=b.mean, std=b.std, out_dir="", weights=source.read_bytes(), train_layers=a.train_layers)
    net = build_network(spec)
    set_trainable(net, a.train_layers)
    params = [{"params": net.head.parameters(), "lr": 1e-3},
              {"params": [q for q in net.backbone.parameters() if q.requires_grad], "lr": 1e-4}]
    opt = torch.optim.AdamW(params)
    mean = torch.tensor(b.mean).view(1, 3, 1, 1)
    std = torch.tensor(b.std).view(1, 3, 1, 1)
    rng = np.random.default_rng(0)
    x8 = torch.from_numpy(rng.integers(0, 255, (a.batch_size, b.input_size, b.input_size, 3), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, 2, a.batch_size))
    net.train()

    def step() -> None:
        x = (x8.permute(0, 3, 1, 2).float() - mean) / std
        opt.zero_grad(set_to_none=True)
        if a.precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = net(x)
        else:
            logits = net(x)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    wall = time.perf_counter() - t0
    print(json.dumps({"model": a.model, "train_layers": a.train_layers, "precision": a.precision, "batch_size": a.batch_size,
                      "threads": torch.get_num_threads(), "images_per_s": round(a.steps * a.batch_size / wall, 2)}))


if __name__ == "__main__":
    main()
