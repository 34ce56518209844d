"""``imgfeat audit``: the leakage report of a features table, on the split `train` would make."""

from __future__ import annotations

import argparse
from typing import Any

from imgfeat.config import Config

HELP = "report duplicates and groups across train/test, class balance and conflicting labels"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", help="features table written by `imgfeat extract` (its --output)")
    p.add_argument("--split-mode", choices=["auto", "column", "hash"], help="the split to audit, as for train (default auto)")
    p.add_argument("--test-fraction", type=float, help="test share per class for the hash split (default 0.2)")
    p.add_argument("--near-duplicate-bits", type=int, help="perceptual hashes this many bits apart are near duplicates (12 of 256)")
    p.add_argument("--format", choices=["auto", "delta", "parquet"], help="format of the features table (default auto)")


def overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "train.features": a.features,
        "train.split_mode": a.split_mode,
        "train.test_fraction": a.test_fraction,
        "train.validity.near_duplicate_bits": a.near_duplicate_bits,
        "output.format": a.format,
    }


def run(a: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    from imgfeat.session import get_spark
    from imgfeat.train.split import audit_table

    report = audit_table(get_spark(cfg), cfg)
    print(report.summary(), flush=True)
    return report.to_dict()
