"""Command line: ``imgfeat extract|train|compare|predict|bench ...``.

Only parses arguments and calls library functions; ``jobs/*.py`` call ``main`` with a fixed command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from imgfeat.config import Config, ConfigError, load_config

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, Config], int]]] = {}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML settings file (repeatable; later wins)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting, e.g. --set inference.batch_size=64")
    parser.add_argument("--master", help="Spark master when not started by spark-submit (default local[*])")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="folder of images (one sub-folder per class)")
    p.add_argument("--output", help="features table: a path, or catalog.schema.table with Delta")
    p.add_argument("--errors", help="errors table (default: <output>_errors)")
    p.add_argument("--model", help="backbone: resnet50, inception_v3, densenet121, vgg19, efficientnet_b0")
    p.add_argument("--weights", help="imagenet | none | /path/to/weights.h5")
    p.add_argument("--weights-sha256", help="stop unless the weights file has this sha256")
    p.add_argument("--format", choices=["auto", "delta", "parquet"], help="table format (default auto)")
    p.add_argument("--mode", choices=["incremental", "overwrite"], help="incremental (default) or overwrite")
    p.add_argument("--batch-size", type=int, help="images per model call")
    p.add_argument("--label-mode", choices=["folder", "manifest", "none"], help="where labels come from")
    p.add_argument("--manifest", help="CSV with path,label (with --label-mode manifest)")
    p.add_argument("--split-mode", choices=["none", "hash", "folder"], help="train/test assignment")


def _extract_overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "input.path": a.input,
        "output.path": a.output,
        "output.errors_path": a.errors,
        "model.name": a.model,
        "model.weights": a.weights,
        "model.weights_sha256": a.weights_sha256,
        "output.format": a.format,
        "output.mode": a.mode,
        "inference.batch_size": a.batch_size,
        "input.label.mode": a.label_mode,
        "input.label.manifest": a.manifest,
        "input.split.mode": a.split_mode,
    }


def _run_extract(a: argparse.Namespace, cfg: Config) -> int:
    from imgfeat.extract import run_extract
    from imgfeat.session import get_spark

    spark = get_spark(cfg)
    result = run_extract(spark, cfg)
    print(result.summary(), flush=True)
    _dump(a, result.to_dict())
    return 0


COMMANDS["extract"] = (_extract_args, _run_extract)

OVERRIDES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"extract": _extract_overrides}


def _dump(a: argparse.Namespace, data: dict[str, Any]) -> None:
    if getattr(a, "json", None):
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgfeat", description="Transfer learning for medical images on Spark")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _) in COMMANDS.items():
        p = sub.add_parser(name)
        add_args(p)
        _common(p)
    return parser


def config_from_args(a: argparse.Namespace) -> Config:
    overrides = OVERRIDES.get(a.command, lambda _: {})(a)
    if a.master:
        overrides["spark.master"] = a.master
    return load_config(a.config, overrides, a.set)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("py4j", "urllib3", "matplotlib", "PIL", "h5py", "git", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = config_from_args(a)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        return COMMANDS[a.command][1](a, cfg)
    except (ConfigError, ValueError, RuntimeError, FileNotFoundError) as exc:
        if a.verbose:
            raise
        print(f"imgfeat {a.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
