"""The training processes' function (run by TorchDistributor, or directly): no Spark, PyTorch only.

Each process streams the decoded table row group by row group (never the whole table), keeps every world-th row
of the epoch's seeded order (same order in every process, so shards are disjoint and equal-sized), augments,
and trains a DistributedDataParallel copy of backbone + new linear head (gloo on CPU, NCCL on GPU). Process 0
validates after every epoch, writes a checkpoint (model, optimizer, schedule, history: loadable with
``weights_only=True``) and the best model so far, and decides early stopping. Every random choice (data order,
augmentation, stochastic depth) is seeded by (seed, epoch, rank) through ``derived_seed``, so a run resumed from
its checkpoint reaches the same weights as one that was never interrupted.

Multi-label (``LoopSpec.findings`` set): the head has one output per finding and the loss is
``imgfeat.train.finding_heads.masked_bce`` (a sigmoid per finding; entries whose finding is unknown weigh nothing;
known positives weigh ``LoopSpec.positive_weights``), in training and validation alike.

``run_loop`` is a sequence of named steps, each a private method of ``_Loop`` (as TorchDistributor's own): join
the process group, build the network and optimizer, plan the schedule, resume, train epoch by epoch (seed, train,
gather, validate and checkpoint on process 0, agree on a ``StopReason``), write the result.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum, IntEnum
from typing import Any

import numpy as np

# Test-only fault injection: stop (as if killed) after this many epochs have been checkpointed.
STOP_ENV = "IMGFEAT_FINETUNE_STOP_AFTER"

# What a run writes under LoopSpec.out_dir (finetune.run reads the result and the best model).
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.pt"  # after every epoch: model, optimizer, scheduler, state; weights_only-loadable
BEST_MODEL_FILE = "best_model.pt"  # the network (state dict) of the best validation loss so far
RESULT_FILE = "result.json"  # process 0's result: history, best epoch, sizes

EVAL_BATCH_SIZE = 64


class StopReason(IntEnum):
    """Why the epoch loop ends after an epoch; the value is what process 0 broadcasts to the others."""

    CONTINUE = 0  # not yet: the next epoch runs (after the last one, the loop ends with its epochs done)
    EARLY_STOP = 1  # ``patience`` epochs without a better validation loss
    STOP_AFTER = 2  # test-only fault injection (STOP_ENV): the processes exit as if killed


class SeedPurpose(str, Enum):
    """The random choices of a fine-tuning run, each seeded by ``derived_seed``."""

    NETWORK = "network"  # the new head's initial weights (and an unweighted backbone's)
    VALIDATION = "validation"  # the hash salt that moves training units to validation (finetune.data)
    ORDER = "order"  # an epoch's row-group and row order, the same in every process
    DROPOUT = "dropout"  # stochastic depth and dropout (torch's global generator), per process and epoch
    AUGMENT = "augment"  # the augmentation's generator (RandomAugment), per process and epoch


def derived_seed(seed: int, purpose: SeedPurpose, epoch: int = 0, rank: int = 0) -> int | list[int]:
    """The seed of one random choice, from ``finetune.seed``: every formula of the run in one place. The numbers are
    those of earlier versions (same seed, same weights), so they keep their quirks: DROPOUT of rank r + 1 equals
    AUGMENT of rank r, and ranks from 10 up overlap the next epoch's.

    NETWORK ``seed``; VALIDATION ``seed + 1``; ORDER the entropy ``[seed, epoch, 7]`` (numpy); DROPOUT
    ``seed * 1000 + epoch * 10 + rank``; AUGMENT that + 1."""
    purpose = SeedPurpose(purpose)
    if purpose is SeedPurpose.NETWORK:
        return seed
    if purpose is SeedPurpose.VALIDATION:
        return seed + 1
    if purpose is SeedPurpose.ORDER:
        return [seed, epoch, 7]
    if purpose is SeedPurpose.DROPOUT:
        return seed * 1000 + epoch * 10 + rank
    if purpose is SeedPurpose.AUGMENT:
        return seed * 1000 + epoch * 10 + rank + 1
    raise ValueError(f"unknown seed purpose {purpose!r}: use a SeedPurpose")


@dataclass
class LoopSpec:
    """Everything a training process reads (``spec`` in this package means this): plain values, picklable."""

    files: list[str]  # the decoded table's Parquet files
    labels: list[str]  # the network's outputs in order: the classes (multi-label: the findings)
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
    augment: dict[str, Any] = field(default_factory=dict)  # RandomAugment's settings (RandomAugment.KEYS)
    threads: int = 0
    findings: list[str] = field(default_factory=list)  # multi-label: the findings (= labels); [] = single-label
    positive_weights: list[float] = field(default_factory=list)  # multi-label: a known positive's weight per finding

    @property
    def multi(self) -> bool:
        """Multi-label: targets and masks per finding, the masked binary cross-entropy."""
        return bool(self.findings)

    @property
    def outputs(self) -> int:
        """The head's outputs: one per finding, or one per class."""
        return len(self.findings) if self.findings else len(self.labels)


def build_network(spec: LoopSpec) -> Any:
    """Backbone (seeded, with ``spec.weights`` when given) + a new linear head over its pooled features."""
    import io

    import torch
    from torch import nn

    from imgfeat.engines import torch_models

    torch.manual_seed(derived_seed(spec.seed, SeedPurpose.NETWORK))
    backbone = torch_models.build(spec.architecture, spec.input_size)
    if spec.weights is not None:
        torch_models.load_weights(backbone, torch.load(io.BytesIO(spec.weights), map_location="cpu", weights_only=True))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(spec.feature_dim, spec.outputs)

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


def epoch_rows(files: list[str], split: str, epoch: int, seed: int, rank: int, world: int,
               shuffle: bool, multi: bool = False) -> Iterator[tuple[int, bytes, Any]]:
    """Yield (row index in its row group, image bytes (uint8 size x size x 3), label) for this process's share of
    ``split``, one row group in memory; ``multi``: (targets, mask) lists in place of the label."""
    import pyarrow.parquet as pq

    targets = ["targets", "mask"] if multi else ["label"]

    groups = [(f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
    rng = np.random.default_rng(derived_seed(seed, SeedPurpose.ORDER, epoch=epoch))  # the same in every process
    order = rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
    position = 0
    for gi in order:
        path, g = groups[gi]
        table = pq.ParquetFile(path).read_row_group(g, columns=["image", *targets, "split"])
        keep = [i for i, s in enumerate(table.column("split").to_pylist()) if s == split]
        inner = rng.permutation(len(keep)) if shuffle else np.arange(len(keep))
        images = table.column("image")
        labels = (list(zip(table.column("targets").to_pylist(), table.column("mask").to_pylist(), strict=True)) if multi
                  else table.column("label").to_pylist())
        for j in inner:
            if position % world == rank:
                yield keep[j], images[keep[j]].as_py(), labels[keep[j]]
            position += 1


def split_column(files: list[str], split: str, column: str) -> list[Any]:
    """``column``'s values for the rows of ``split``, in the order ``epoch_rows(..., shuffle=False)`` yields them."""
    import pyarrow.parquet as pq

    out: list[Any] = []
    for f in files:
        table = pq.read_table(f, columns=[column, "split"])
        out += [v for v, s in zip(table.column(column).to_pylist(), table.column("split").to_pylist(), strict=True)
                if s == split]
    return out


def count_rows(files: list[str], split: str) -> int:
    """Rows of ``split`` in the table's files (reads the split column only)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return sum(int(pc.sum(pc.equal(pq.read_table(f, columns=["split"]).column("split"), split)).as_py() or 0) for f in files)


class RandomAugment:
    """Random small rotation, shift, scale, brightness and contrast (and optional horizontal flip) of a float batch
    (n, 3, s, s) in 0..255. As MONAI's Randomizable transforms: ``__init__`` keeps the settings, typed;
    ``set_random_state`` seeds the one generator every draw comes from (a CPU generator, so the draws are the same
    on every device); ``randomize`` draws a batch's parameters; ``__call__`` draws and applies them."""

    KEYS = ("rotate_degrees", "shift", "scale", "brightness", "contrast", "hflip")

    def __init__(self, settings: Mapping[str, Any]) -> None:
        missing = [k for k in self.KEYS if k not in settings]
        if missing:
            raise ValueError(f"the augmentation settings lack {', '.join(missing)}: LoopSpec.augment needs "
                             f"{', '.join(self.KEYS)} (the finetune.* settings of the same names)")
        self.rotate_degrees = float(settings["rotate_degrees"])
        self.shift = float(settings["shift"])
        self.scale = float(settings["scale"])
        self.brightness = float(settings["brightness"])
        self.contrast = float(settings["contrast"])
        self.hflip = bool(settings["hflip"])
        self.generator: Any = None

    def set_random_state(self, seed: int) -> RandomAugment:
        import torch

        self.generator = torch.Generator().manual_seed(seed)
        return self

    def randomize(self, n: int) -> dict[str, Any]:
        """``n`` images' parameters, drawn in a fixed order (angle, scale, shift x, y, flip, brightness, contrast)."""
        import torch

        if self.generator is None:
            raise RuntimeError("RandomAugment draws from its own generator: call set_random_state(seed) first")

        def uniform(low: float, high: float) -> Any:
            return low + (high - low) * torch.rand(n, generator=self.generator)

        angle = uniform(-self.rotate_degrees, self.rotate_degrees) * math.pi / 180
        scale = uniform(1 - self.scale, 1 + self.scale)
        tx, ty = uniform(-self.shift, self.shift) * 2, uniform(-self.shift, self.shift) * 2
        flip = (torch.rand(n, generator=self.generator) < 0.5) if self.hflip else torch.zeros(n, dtype=torch.bool)
        brightness = uniform(-self.brightness, self.brightness).view(n, 1, 1, 1) * 255
        contrast = uniform(1 - self.contrast, 1 + self.contrast).view(n, 1, 1, 1)
        return {"angle": angle, "scale": scale, "tx": tx, "ty": ty, "flip": flip, "brightness": brightness,
                "contrast": contrast}

    def __call__(self, x: Any) -> Any:
        import torch
        from torch.nn import functional as F

        d = {k: v.to(x.device) for k, v in self.randomize(x.shape[0]).items()}
        sx = torch.where(d["flip"], -1.0, 1.0)
        cos, sin = torch.cos(d["angle"]) / d["scale"], torch.sin(d["angle"]) / d["scale"]
        theta = torch.stack([torch.stack([cos * sx, -sin, d["tx"]], 1), torch.stack([sin * sx, cos, d["ty"]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * d["contrast"] + mean + d["brightness"]).clamp(0, 255)


def _batches(rows: Any, labels: list[str], batch_size: int, size: int, limit: float,
             multi: bool = False) -> Iterator[tuple[Any, Any]]:
    """(uint8 images (n, size, size, 3), label indices) batches of ``rows``: at most ``limit`` full batches, or
    every row (the last batch partial) when ``limit`` is infinite. ``multi``: targets and masks (n, 2, findings)
    float32 in place of the label indices."""
    import torch

    index = {lab: i for i, lab in enumerate(labels)}
    xs, ys, done = [], [], 0
    for _, data, label in rows:
        xs.append(np.frombuffer(data, np.uint8).reshape(size, size, 3))
        ys.append(label if multi else index[label])
        if len(xs) == batch_size:
            yield torch.from_numpy(np.stack(xs)), _target_tensor(ys, multi)
            xs, ys = [], []
            done += 1
            if done >= limit:
                return
    if xs and limit == math.inf:
        yield torch.from_numpy(np.stack(xs)), _target_tensor(ys, multi)


def _target_tensor(ys: list[Any], multi: bool) -> Any:
    import torch

    return torch.from_numpy(np.asarray(ys, dtype=np.float32)) if multi else torch.tensor(ys)


def multi_label_loss(logits: Any, yb: Any, pos_weight: Any) -> Any:
    """The multi-label loss of a batch: ``masked_bce`` over the known entries (``yb``: (n, 2, findings) targets and
    masks), known positives weighted by ``pos_weight``."""
    from imgfeat.train.finding_heads import masked_bce

    return masked_bce(logits, yb[:, 0], yb[:, 1], pos_weight)


def _positive_weights(spec: LoopSpec, device: Any) -> Any:
    import torch

    return torch.tensor(spec.positive_weights or [1.0] * spec.outputs, dtype=torch.float32, device=device)


def evaluate(net: Any, spec: LoopSpec, split: str, device: Any) -> dict[str, Any]:
    """Loss, accuracy and class probabilities of ``net`` on a whole split (one process). Multi-label: the loss of
    training (``multi_label_loss``, per known entry), the accuracy of the known entries at 0.5, per-finding
    probabilities, ``y`` the targets and ``mask`` (n, findings), ``known`` the known entries."""
    import torch

    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    pos_weight = _positive_weights(spec, device) if spec.multi else None
    net.eval()
    ys, probs, loss_sum, weight_sum = [], [], 0.0, 0.0
    with torch.inference_mode():
        rows = epoch_rows(spec.files, split, 0, spec.seed, 0, 1, shuffle=False, multi=spec.multi)
        for xb, yb in _batches(rows, spec.labels, EVAL_BATCH_SIZE, spec.input_size, math.inf, spec.multi):
            x = (xb.to(device).permute(0, 3, 1, 2).float() - mean) / std
            logits, yb = net(x).float(), yb.to(device)
            if spec.multi:
                known = float(yb[:, 1].sum())
                loss_sum += float(multi_label_loss(logits, yb, pos_weight)) * known
                weight_sum += known
                probs.append(torch.sigmoid(logits).cpu().numpy())
            else:
                loss_sum += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
                weight_sum += len(yb)
                probs.append(torch.softmax(logits, 1).cpu().numpy())
            ys.append(yb.cpu().numpy())
    return _split_result(spec, ys, probs, loss_sum, weight_sum)


def _split_result(spec: LoopSpec, ys: list[np.ndarray], probs: list[np.ndarray], loss_sum: float,
                  weight_sum: float) -> dict[str, Any]:
    if not ys:
        empty = np.zeros((0, spec.outputs))
        extra = {"mask": empty, "known": 0} if spec.multi else {}
        return {"n": 0, "loss": float("nan"), "accuracy": float("nan"), "y": empty if spec.multi else np.array([]),
                "proba": empty, **extra}
    y, proba = np.concatenate(ys), np.concatenate(probs)
    if not spec.multi:
        return {"n": len(y), "loss": loss_sum / len(y), "accuracy": float((proba.argmax(1) == y).mean()), "y": y,
                "proba": proba}
    target, mask = y[:, 0], y[:, 1]
    known = mask > 0
    accuracy = float(((proba >= 0.5) == (target > 0.5))[known].mean()) if known.any() else float("nan")
    return {"n": len(y), "loss": loss_sum / weight_sum if weight_sum else float("nan"), "accuracy": accuracy,
            "y": target, "mask": mask, "proba": proba, "known": int(known.sum())}


def macro_auc(y: np.ndarray, mask: np.ndarray, proba: np.ndarray) -> float | None:
    """The mean ROC AUC over the findings with both classes among their known entries; None without any."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for j in range(y.shape[1]):
        known = mask[:, j] > 0
        positive = y[known, j] > 0.5
        if positive.any() and not positive.all():
            aucs.append(float(roc_auc_score(positive, proba[known, j])))
    return float(np.mean(aucs)) if aucs else None


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _initial_state() -> dict[str, Any]:
    """The loop's progress as saved in the checkpoint (plain values, so ``weights_only=True`` loads it)."""
    return {"epoch": -1, "history": [], "best_val_loss": math.inf, "best_epoch": -1, "bad_epochs": 0}


def _epoch_record(epoch: int, totals: Any, val: dict[str, Any], learning_rate: float, n_labels: int,
                  multi: bool = False) -> dict[str, Any]:
    """One epoch's line of the history (and its MLflow metrics): training totals over all processes, validation
    (multi-label: ``val_auc_macro`` over the findings with both classes)."""
    record = {"epoch": epoch, "train_loss": float(totals[0] / max(1.0, float(totals[1]))),
              "train_images": int(totals[1]), "train_seconds": float(totals[2]),
              "train_images_per_s": float(totals[1] / max(1e-9, float(totals[2]))),
              "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_images": val["n"],
              "learning_rate": learning_rate}
    if multi:
        auc = macro_auc(val["y"], val["mask"], val["proba"]) if val["n"] else None
        if auc is not None:
            record["val_auc_macro"] = auc
    elif n_labels == 2 and val["n"] and len(set(val["y"].tolist())) == 2:
        from sklearn.metrics import roc_auc_score

        record["val_auc"] = float(roc_auc_score(val["y"], val["proba"][:, 1]))
    return record


class _Loop:
    """One training process: the steps of ``run_loop``, each a private method, and the state they share."""

    distributed: bool  # _join_group: the process group, this process's place in it, its device
    rank: int
    world: int
    device: Any
    net: Any  # _build: backbone + head, the blocks trained, AdamW
    trained_blocks: list[Any]
    optimizer: Any
    steps_per_epoch: int  # _plan_steps
    scheduler: Any
    model: Any  # _prepare_training: net, or its DistributedDataParallel wrapper
    loss_fn: Any
    mean: Any
    std: Any
    autocast: Any

    def __init__(self, spec: LoopSpec) -> None:
        self.spec = spec
        self.checkpoint = os.path.join(spec.out_dir, CHECKPOINT_DIR, CHECKPOINT_FILE)
        self.state = _initial_state()
        self.augment = RandomAugment(spec.augment)
        self.stop_after = int(os.environ.get(STOP_ENV, "0") or 0)

    def _join_group(self) -> None:
        """Join the process group (when started with several), pick threads and device, make the folders."""
        import torch
        import torch.distributed as dist

        spec = self.spec
        self.distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
        if self.distributed:
            dist.init_process_group("nccl" if spec.use_gpu else "gloo")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // self.world))
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if spec.use_gpu else "cpu")
        os.makedirs(os.path.join(spec.out_dir, CHECKPOINT_DIR), exist_ok=True)

    def _build(self) -> None:
        """The network (seeded), its trained blocks, and AdamW with the backbone's scaled learning rate."""
        import torch

        spec = self.spec
        self.net = build_network(spec).to(self.device)
        self.trained_blocks = set_trainable(self.net, spec.train_layers)
        head_params = list(self.net.head.parameters())
        backbone_params = [p for p in self.net.backbone.parameters() if p.requires_grad]
        groups = [{"params": head_params, "lr": spec.learning_rate}]
        if backbone_params:
            groups.append({"params": backbone_params, "lr": spec.learning_rate * spec.backbone_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=spec.weight_decay)

    def _plan_steps(self) -> None:
        """Steps per epoch (full batches in every process) and the warm-up + cosine schedule over all of them."""
        import torch

        spec = self.spec
        n_train = count_rows(spec.files, "train")
        self.steps_per_epoch = n_train // self.world // spec.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"{n_train} training images cannot fill one batch of {spec.batch_size} in each of {self.world} "
                             "processes: lower finetune.batch_size or finetune.num_processes")
        total = self.steps_per_epoch * spec.epochs
        warmup = max(1, int(spec.warmup_fraction * total))
        # A plain function (not a callable object), so the scheduler's state_dict saves no lambda state.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: warmup_cosine(step, warmup, total))

    def _resume(self) -> None:
        """With ``spec.resume``: model, optimizer, schedule and progress from the last checkpoint, when there is one."""
        import torch

        if self.spec.resume and os.path.exists(self.checkpoint):
            saved = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            self.net.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.state = saved["state"]

    def _prepare_training(self) -> None:
        """DistributedDataParallel (across processes), the weighted loss (multi-label: ``multi_label_loss``),
        normalisation and autocast."""
        import torch
        from torch.nn.parallel import DistributedDataParallel

        spec, device = self.spec, self.device
        self.model = DistributedDataParallel(self.net) if self.distributed else self.net
        if spec.multi:
            self.loss_fn = functools.partial(multi_label_loss, pos_weight=_positive_weights(spec, device))
        else:
            weight = torch.tensor(spec.class_weights, dtype=torch.float32, device=device) if spec.class_weights else None
            self.loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        self.autocast = torch.bfloat16 if spec.precision == "bf16" else None

    def _seed_epoch(self, epoch: int) -> None:
        """Every random draw of this process's epoch: torch's global generator, the augmentation's own."""
        import torch

        seed = self.spec.seed
        torch.manual_seed(derived_seed(seed, SeedPurpose.DROPOUT, epoch=epoch, rank=self.rank))  # stochastic depth, dropout
        self.augment.set_random_state(derived_seed(seed, SeedPurpose.AUGMENT, epoch=epoch, rank=self.rank))

    def _train_mode(self) -> None:
        self.model.train()
        for module in self.net.backbone.modules():  # frozen blocks keep their normalisation statistics
            module.train(False)
        for block in self.trained_blocks:
            block.train(True)

    def _step(self, xb: Any, yb: Any) -> float:
        """One optimizer and schedule step on a uint8 batch; returns the batch's mean loss."""
        import torch

        x = xb.to(self.device).permute(0, 3, 1, 2).float()
        x = (self.augment(x) - self.mean) / self.std
        self.optimizer.zero_grad(set_to_none=True)
        if self.autocast is not None:
            with torch.autocast(self.device.type, dtype=self.autocast):
                logits = self.model(x)
        else:
            logits = self.model(x)
        loss = self.loss_fn(logits.float(), yb.to(self.device))
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def _train_epoch(self, epoch: int) -> Any:
        """This process's share of the epoch; its totals (loss sum, images, seconds), summed over the processes
        (seconds: the slowest)."""
        import time

        import torch
        import torch.distributed as dist

        spec = self.spec
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        rows = epoch_rows(spec.files, "train", epoch, spec.seed, self.rank, self.world, shuffle=True, multi=spec.multi)
        for xb, yb in _batches(rows, spec.labels, spec.batch_size, spec.input_size, self.steps_per_epoch, spec.multi):
            seen += len(yb)
            loss_sum += self._step(xb, yb) * len(yb)
        totals = torch.tensor([loss_sum, float(seen), time.perf_counter() - started], dtype=torch.float64)
        if self.distributed:
            seconds = totals[2].clone()
            dist.all_reduce(totals)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            totals[2] = seconds
        return totals

    def _validate_and_checkpoint(self, epoch: int, totals: Any) -> StopReason:
        """Process 0: validate, record the epoch, keep the best model, write the checkpoint; whether to stop."""
        import torch

        spec, state = self.spec, self.state
        val = evaluate(self.net, spec, "val", self.device)
        state["history"].append(_epoch_record(epoch, totals, val, float(self.scheduler.get_last_lr()[0]), len(spec.labels),
                                              spec.multi))
        # No validation image (or, multi-label, no known validation entry): the latest epoch is the best one.
        if val["n"] == 0 or val.get("known") == 0 or val["loss"] < state["best_val_loss"]:
            state["best_val_loss"], state["best_epoch"], state["bad_epochs"] = val["loss"], epoch, 0
            torch.save(self.net.state_dict(), os.path.join(spec.out_dir, BEST_MODEL_FILE))
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        torch.save({"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "state": state}, self.checkpoint + ".tmp")
        os.replace(self.checkpoint + ".tmp", self.checkpoint)
        reason = StopReason.CONTINUE
        if spec.patience and state["bad_epochs"] >= spec.patience:
            reason = StopReason.EARLY_STOP
        if self.stop_after and epoch + 1 >= self.stop_after:
            reason = StopReason.STOP_AFTER
        return reason

    def _agree(self, reason: StopReason) -> StopReason:
        """Process 0's reason, in every process."""
        import torch
        import torch.distributed as dist

        stop = torch.tensor([int(reason)])
        if self.distributed:
            dist.broadcast(stop, 0)
        return StopReason(int(stop[0]))

    def _epoch(self, epoch: int) -> StopReason:
        self._seed_epoch(epoch)
        self._train_mode()
        totals = self._train_epoch(epoch)
        reason = self._validate_and_checkpoint(epoch, totals) if self.rank == 0 else StopReason.CONTINUE
        return self._agree(reason)

    def _train(self) -> None:
        """The epochs left (all, or those after the checkpoint's), until the last one or a stop."""
        import torch.distributed as dist

        for epoch in range(self.state["epoch"] + 1, self.spec.epochs):
            reason = self._epoch(epoch)
            if reason is StopReason.STOP_AFTER:
                if self.distributed:
                    dist.destroy_process_group()
                raise SystemExit(f"{STOP_ENV}: stopped after epoch {epoch}")
            if reason is StopReason.EARLY_STOP:
                break

    def _result(self) -> dict[str, Any] | None:
        """Process 0: the history and the best epoch, also written to RESULT_FILE; None in the others."""
        if self.rank != 0:
            return None
        state = self.state
        result = {"history": state["history"], "best_epoch": state["best_epoch"], "best_val_loss": state["best_val_loss"],
                  "world_size": self.world, "steps_per_epoch": self.steps_per_epoch,
                  "trained_blocks": len(self.trained_blocks),
                  "trainable_parameters": sum(p.numel() for p in self.net.parameters() if p.requires_grad)}
        with open(os.path.join(self.spec.out_dir, RESULT_FILE), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=float)
        return result

    def _leave_group(self) -> None:
        import torch.distributed as dist

        if self.distributed:
            dist.barrier()
            dist.destroy_process_group()

    def run(self) -> dict[str, Any] | None:
        self._join_group()
        self._build()
        self._plan_steps()
        self._resume()
        self._prepare_training()
        self._train()
        result = self._result()
        self._leave_group()
        return result


def run_loop(spec: LoopSpec) -> dict[str, Any] | None:
    """Train; process 0 returns (and writes to ``out_dir``/RESULT_FILE) the history and the best epoch."""
    return _Loop(spec).run()


def spec_dict(spec: LoopSpec) -> dict[str, Any]:
    """The spec's settings as plain values, without the weights' bytes (for logging)."""
    d = asdict(spec)
    d.pop("weights")
    return d
