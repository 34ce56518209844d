"""The classifier folder of imgfeat's model flavour: its file names, ``classifier.json`` (``ClassifierInfo``),
writing the folder (``save_model``) and reading its description from inside the model's folder only (``inside``).
The flavour's verbs (save, log, load) and requirements: ``imgfeat.scoring.flavor``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

from imgfeat.backbones.registry import get_backbone
from imgfeat.io.decoders import DecodeOptions
from imgfeat.scoring.heads import HeadArrays

CLASSIFIER_FILE = "classifier.json"
HEAD_DIR = "head"
HEAD_FILES = ("head.json", "head.npz")
WEIGHTS_DIR = "weights"
FORMAT_VERSION = 1  # of classifier.json; models logged by older imgfeat versions with the same number load


def inside(root: str, path: str, what: str) -> str:
    """The real path of ``path`` (symlinks resolved); ValueError when it lies outside the real path of ``root``."""
    base = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([base, real]) != base:
        raise ValueError(f"the model's {what} ({os.path.relpath(path, root)!r}) resolves to {real}, outside the model "
                         f"folder {base}: refusing to read it. A model must carry its files; re-log it with `imgfeat train`")
    return real


@dataclass(frozen=True, kw_only=True)
class ClassifierInfo:
    """``classifier.json``: what the served model needs besides its arrays. Field order is the file's key order."""

    format_version: int = FORMAT_VERSION
    backbone: str
    engine: str
    input_size: int
    feature_dim: int
    weights: str  # imagenet | none | file
    weights_id: str
    weights_sha256: str
    seed: int
    decode: DecodeOptions
    precision: str
    labels: list[str]
    head: str  # the head's name (lr, rf, ..., finetuned)
    head_kind: str  # HeadArrays.kind
    run_id: str | None = None
    weights_file: str | None = None  # weights/<name> inside the folder, with weights: file; absent from the file otherwise
    # Multi-label (task "multi"): the findings in the head's order (labels = the same list), each one's decision
    # threshold; task, findings and thresholds are absent from a single-label file (it reads as before).
    task: str = "single"  # single | multi
    findings: list[str] | None = None
    thresholds: list[float] | None = None
    # How a study's images combine into the study's probabilities (train.aggregation: mean | max | noisy_or);
    # absent (None) when the run did not aggregate.
    aggregation: str | None = None

    @classmethod
    def describe(cls, *, model_name: str, weights: str, weights_sha256: str, seed: int, weights_id: str,
                 decode: DecodeOptions, precision: str, labels: list[str], head_name: str, head_kind: str,
                 run_id: str | None = None, findings: list[str] | None = None, thresholds: list[float] | None = None,
                 aggregation: str | None = None) -> ClassifierInfo:
        """The description of a ``model_name`` backbone + head; engine and feature width from the registry.
        ``findings`` (with ``thresholds``): a multi-label head (task multi)."""
        backbone = get_backbone(model_name)
        multi = {"task": "multi", "findings": list(findings), "thresholds": [float(t) for t in thresholds or []]} \
            if findings is not None else {}
        return cls(backbone=model_name, engine=backbone.engine, input_size=decode.size, feature_dim=backbone.feature_dim,
                   weights=weights, weights_id=weights_id, weights_sha256=weights_sha256, seed=seed, decode=decode,
                   precision=precision, labels=list(labels), head=head_name, head_kind=head_kind, run_id=run_id,
                   aggregation=aggregation, **multi)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``classifier.json`` (``weights_file`` only when there is one; the multi-label fields
        only for task multi; ``aggregation`` only when set)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(decode=self.decode.to_dict(), labels=list(self.labels))
        if self.weights_file is None:
            del out["weights_file"]
        if self.task == "single":
            for key in ("task", "findings", "thresholds"):
                del out[key]
        if self.aggregation is None:
            del out["aggregation"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierInfo:
        """The description ``to_dict`` wrote; unknown keys are ignored, missing ones are a ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{CLASSIFIER_FILE} lacks {missing}; re-log the model with `imgfeat train`")
        values = {k: v for k, v in data.items() if k in names}
        return cls(**{**values, "decode": DecodeOptions.from_dict(data["decode"])})


def read_info(folder: str, root: str) -> ClassifierInfo:
    """``folder``'s classifier.json, read only from inside ``root``; ValueError for another format version."""
    with open(inside(root, os.path.join(folder, CLASSIFIER_FILE), CLASSIFIER_FILE), encoding="utf-8") as fh:
        data = json.load(fh)
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: classifier format {data.get('format_version')} is not {FORMAT_VERSION}; "
                         "this imgfeat cannot read it")
    return ClassifierInfo.from_dict(data)


def save_model(path: str, info: ClassifierInfo, head: HeadArrays, weights_file: str | None = None) -> str:
    """Write the classifier folder ``ImageClassifier`` reads to ``path`` (``weights_file`` copied in); returns it."""
    os.makedirs(path, exist_ok=True)
    if weights_file:
        os.makedirs(os.path.join(path, WEIGHTS_DIR), exist_ok=True)
        name = os.path.basename(weights_file)
        shutil.copyfile(weights_file, os.path.join(path, WEIGHTS_DIR, name))
        info = dataclasses.replace(info, weights="file", weights_file=f"{WEIGHTS_DIR}/{name}")
    head.save(os.path.join(path, HEAD_DIR))
    with open(os.path.join(path, CLASSIFIER_FILE), "w", encoding="utf-8") as fh:
        json.dump(info.to_dict(), fh, indent=2)
    return path
