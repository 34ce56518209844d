"""``imgfeat bench``: our extract job vs a plain Keras or PyTorch script (the backbone's engine) on the same images."""

from __future__ import annotations

import argparse
from typing import Any

from imgfeat.config import Config

HELP = "benchmark extract against a plain Keras / PyTorch script on the same images"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder of images (repeated to reach --limit)")
    p.add_argument("--model", default="resnet50", help="backbone (random weights)")
    p.add_argument("--limit", type=int, default=2000, help="number of images N")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workdir", help="where inputs, outputs and logs go (default: a temp folder)")
    p.add_argument("--skip-baseline", action="store_true", help="time only our job")
    p.add_argument("--extract-set", action="append", default=[], metavar="KEY=VALUE",
                   help="setting passed to our extract job (repeatable; --set and --config are passed too)")


def overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {}


def run(a: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    from imgfeat.bench.run import run_bench, to_json

    result = run_bench(
        a.input, model=a.model, limit=a.limit, master=a.master or "local[*]", batch_size=a.batch_size,
        sets=[*a.set, *a.extract_set], configs=a.config, workdir=a.workdir, skip_baseline=a.skip_baseline,
    )
    print(result.table(), flush=True)
    return to_json(result)
