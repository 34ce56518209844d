"""The training processes' function (run by TorchDistributor, or directly): no Spark, PyTorch only.

Each process streams the decoded table row group by row group (never the whole table), keeps every world-th row
of the epoch's seeded order (same order in every process, so shards are disjoint and equal-sized), augments,
and trains a DistributedDataParallel copy of backbone + new linear head (gloo on CPU, NCCL on GPU). Process 0
validates after every epoch, writes a checkpoint (model, optimizer, schedule, history: loadable with
``weights_only=True``) and the best model so far, and decides early stopping. Every random choice (data order,
augmentation, stochastic depth) is seeded by (seed, epoch, rank), so a run resumed from its checkpoint reaches
the same weights as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Test-only fault injection: stop (as if killed) after this many epochs have been checkpointed.
STOP_ENV = "IMGFEAT_FINETUNE_STOP_AFTER"


@dataclass
class LoopSpec:
    files: list[str]  # the decoded table's Parquet files
    labels: list[str]
    architecture: str  # imgfeat.engines.torch_models constructor
    input_size: int
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    out_dir: str
    weights: bytes | None = field(default=None, repr=False)  # initial backbone weights (state dict file bytes)
    seed: int = 42
    train_layers: str = "last:3"
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.1
    class_weights: list[float] | None = None
    patience: int = 2
    precision: str = "fp32"
    use_gpu: bool = False
    resume: bool = False
    augment: dict[str, Any] = field(default_factory=dict)
    threads: int = 0


def build_network(spec: LoopSpec) -> Any:
    """Backbone (seeded, with ``spec.weights`` when given) + a new linear head over its pooled features."""
    import io

    import torch
    from torch import nn

    from imgfeat.engines import torch_models

    torch.manual_seed(spec.seed)
    backbone = torch_models.build(spec.architecture, spec.input_size)
    if spec.weights is not None:
        torch_models.load_weights(backbone, torch.load(io.BytesIO(spec.weights), map_location="cpu", weights_only=True))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(spec.feature_dim, len(spec.labels))

        def forward(self, x: Any) -> Any:
            return self.head(self.backbone(x))

    return Net()


def trainable_blocks(module: Any) -> list[Any]:
    """The backbone's blocks in input-to-output order (``blocks()`` where the architecture defines it)."""
    from torch import nn

    if hasattr(module, "blocks"):
        return list(module.blocks())
    out = []
    for child in module.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            out += list(child.children())
        else:
            out.append(child)
    return [b for b in out if any(True for _ in b.parameters())]


def set_trainable(net: Any, train_layers: str) -> list[Any]:
    """Freeze what ``train_layers`` leaves out; returns the trained backbone blocks."""
    for p in net.backbone.parameters():
        p.requires_grad_(False)
    blocks = trainable_blocks(net.backbone)
    if train_layers == "head":
        chosen: list[Any] = []
    elif train_layers == "all":
        chosen = blocks
    elif train_layers.startswith("last:") and train_layers[5:].isdigit():
        k = int(train_layers[5:])
        chosen = blocks[-k:] if k else []
    else:
        raise ValueError(f"finetune.train_layers={train_layers!r}: use head, last:K or all")
    for block in chosen:
        for p in block.parameters():
            p.requires_grad_(True)
    return chosen


def epoch_rows(files: list[str], split: str, epoch: int, seed: int, rank: int, world: int, shuffle: bool) -> Any:
    """Yield (image uint8 (s, s, 3), label) for this process's share of ``split``, one row group in memory."""
    import pyarrow.parquet as pq

    groups = [(f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
    rng = np.random.default_rng([seed, epoch, 7])  # the same in every process
    order = rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
    position = 0
    for gi in order:
        path, g = groups[gi]
        table = pq.ParquetFile(path).read_row_group(g, columns=["image", "label", "split"])
        keep = [i for i, s in enumerate(table.column("split").to_pylist()) if s == split]
        inner = rng.permutation(len(keep)) if shuffle else np.arange(len(keep))
        images, labels = table.column("image"), table.column("label").to_pylist()
        for j in inner:
            if position % world == rank:
                yield keep[j], images[keep[j]].as_py(), labels[keep[j]]
            position += 1


def count_rows(files: list[str], split: str) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return sum(int(pc.sum(pc.equal(pq.read_table(f, columns=["split"]).column("split"), split)).as_py() or 0) for f in files)


def augment(x: Any, cfg: dict[str, Any], generator: Any) -> Any:
    """Random small rotation, shift, scale, brightness and contrast (and optional flip) of a float batch (n, 3, s, s)
    in 0..255, drawn from ``generator``."""
    import torch
    from torch.nn import functional as F

    n = x.shape[0]

    def uniform(low: float, high: float) -> Any:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-cfg["rotate_degrees"], cfg["rotate_degrees"]) * math.pi / 180
    scale = uniform(1 - cfg["scale"], 1 + cfg["scale"])
    tx, ty = uniform(-cfg["shift"], cfg["shift"]) * 2, uniform(-cfg["shift"], cfg["shift"]) * 2
    flip = (torch.rand(n, generator=generator) < 0.5) if cfg["hflip"] else torch.zeros(n, dtype=torch.bool)
    sx = torch.where(flip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * sx, -sin, tx], 1), torch.stack([sin * sx, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brightness = uniform(-cfg["brightness"], cfg["brightness"]).view(n, 1, 1, 1) * 255
    contrast = uniform(1 - cfg["contrast"], 1 + cfg["contrast"]).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp(0, 255)


def _batches(rows: Any, labels: list[str], batch_size: int, size: int, limit: int) -> Any:
    import torch

    index = {lab: i for i, lab in enumerate(labels)}
    xs, ys, done = [], [], 0
    for _, data, label in rows:
        xs.append(np.frombuffer(data, np.uint8).reshape(size, size, 3))
        ys.append(index[label])
        if len(xs) == batch_size:
            yield torch.from_numpy(np.stack(xs)), torch.tensor(ys)
            xs, ys = [], []
            done += 1
            if done >= limit:
                return
    if xs and limit == math.inf:
        yield torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def evaluate(net: Any, spec: LoopSpec, split: str, device: Any) -> dict[str, Any]:
    """Loss, accuracy and class probabilities of ``net`` on a whole split (one process)."""
    import torch

    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    net.eval()
    ys, probs, loss_sum = [], [], 0.0
    with torch.inference_mode():
        rows = epoch_rows(spec.files, split, 0, spec.seed, 0, 1, shuffle=False)
        for xb, yb in _batches(rows, spec.labels, 64, spec.input_size, math.inf):
            x = (xb.to(device).permute(0, 3, 1, 2).float() - mean) / std
            logits = net(x).float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, yb.to(device), reduction="sum"))
            probs.append(torch.softmax(logits, 1).cpu().numpy())
            ys.append(yb.numpy())
    if not ys:
        return {"n": 0, "loss": float("nan"), "accuracy": float("nan"), "y": np.array([]), "proba": np.zeros((0, len(spec.labels)))}
    y, proba = np.concatenate(ys), np.concatenate(probs)
    return {"n": len(y), "loss": loss_sum / len(y), "accuracy": float((proba.argmax(1) == y).mean()), "y": y, "proba": proba}


def run_loop(spec: LoopSpec) -> dict[str, Any] | None:
    """Train; process 0 returns (and writes to out_dir/result.json) the history and the best epoch."""
    import time

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("nccl" if spec.use_gpu else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // world))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if spec.use_gpu else "cpu")
    os.makedirs(os.path.join(spec.out_dir, "checkpoints"), exist_ok=True)
    checkpoint = os.path.join(spec.out_dir, "checkpoints", "last.pt")

    net = build_network(spec).to(device)
    trained_blocks = set_trainable(net, spec.train_layers)
    head_params = list(net.head.parameters())
    backbone_params = [p for p in net.backbone.parameters() if p.requires_grad]
    groups = [{"params": head_params, "lr": spec.learning_rate}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": spec.learning_rate * spec.backbone_lr_scale})
    optimizer = torch.optim.AdamW(groups, weight_decay=spec.weight_decay)
    n_train = count_rows(spec.files, "train")
    steps_per_epoch = n_train // world // spec.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{n_train} training images cannot fill one batch of {spec.batch_size} in each of {world} "
                         "processes: lower finetune.batch_size or finetune.num_processes")
    total = steps_per_epoch * spec.epochs
    warmup = max(1, int(spec.warmup_fraction * total))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state = {"epoch": -1, "history": [], "best_val_loss": math.inf, "best_epoch": -1, "bad_epochs": 0}
    if spec.resume and os.path.exists(checkpoint):
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
    model = DistributedDataParallel(net) if distributed else net
    weight = torch.tensor(spec.class_weights, dtype=torch.float32, device=device) if spec.class_weights else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    autocast = torch.bfloat16 if spec.precision == "bf16" else None
    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)

    for epoch in range(state["epoch"] + 1, spec.epochs):
        torch.manual_seed(spec.seed * 1000 + epoch * 10 + rank)  # stochastic depth, dropout
        generator = torch.Generator().manual_seed(spec.seed * 1000 + epoch * 10 + rank + 1)
        model.train()
        for module in net.backbone.modules():  # frozen blocks keep their normalisation statistics
            module.train(False)
        for block in trained_blocks:
            block.train(True)
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        rows = epoch_rows(spec.files, "train", epoch, spec.seed, rank, world, shuffle=True)
        for xb, yb in _batches(rows, spec.labels, spec.batch_size, spec.input_size, steps_per_epoch):
            x = xb.to(device).permute(0, 3, 1, 2).float()
            x = (augment(x, spec.augment, generator) - mean) / std
            optimizer.zero_grad(set_to_none=True)
            if autocast is not None:
                with torch.autocast(device.type, dtype=autocast):
                    logits = model(x)
            else:
                logits = model(x)
            loss = loss_fn(logits.float(), yb.to(device))
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(yb)
            loss_sum += float(loss.detach()) * len(yb)
        train_seconds = time.perf_counter() - started
        totals = torch.tensor([loss_sum, float(seen), train_seconds], dtype=torch.float64)
        if distributed:
            seconds = totals[2].clone()
            dist.all_reduce(totals)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            totals[2] = seconds
        stop = torch.tensor([0])
        if rank == 0:
            val = evaluate(net, spec, "val", device)
            record = {"epoch": epoch, "train_loss": float(totals[0] / max(1.0, float(totals[1]))),
                      "train_images": int(totals[1]), "train_seconds": float(totals[2]),
                      "train_images_per_s": float(totals[1] / max(1e-9, float(totals[2]))),
                      "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_images": val["n"],
                      "learning_rate": float(scheduler.get_last_lr()[0])}
            if len(spec.labels) == 2 and val["n"] and len(set(val["y"].tolist())) == 2:
                from sklearn.metrics import roc_auc_score

                record["val_auc"] = float(roc_auc_score(val["y"], val["proba"][:, 1]))
            state["history"].append(record)
            improved = val["n"] == 0 or val["loss"] < state["best_val_loss"]
            if improved:
                state["best_val_loss"], state["best_epoch"], state["bad_epochs"] = val["loss"], epoch, 0
                torch.save(net.state_dict(), os.path.join(spec.out_dir, "best_model.pt"))
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "state": state}, checkpoint + ".tmp")
            os.replace(checkpoint + ".tmp", checkpoint)
            if spec.patience and state["bad_epochs"] >= spec.patience:
                stop[0] = 1
            if stop_after and epoch + 1 >= stop_after:
                stop[0] = 2
        if distributed:
            dist.broadcast(stop, 0)
        if int(stop[0]) == 2:
            if distributed:
                dist.destroy_process_group()
            raise SystemExit(f"{STOP_ENV}: stopped after epoch {epoch}")
        if int(stop[0]) == 1:
            break
    result = None
    if rank == 0:
        result = {"history": state["history"], "best_epoch": state["best_epoch"], "best_val_loss": state["best_val_loss"],
                  "world_size": world, "steps_per_epoch": steps_per_epoch, "trained_blocks": len(trained_blocks),
                  "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad)}
        with open(os.path.join(spec.out_dir, "result.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=float)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def spec_dict(spec: LoopSpec) -> dict[str, Any]:
    d = asdict(spec)
    d.pop("weights")
    return d
