"""Command line: ``imgfeat extract|audit|train|finetune|compare|predict|serve|bench ...``.

Only parses arguments and calls library functions (one module per command in ``imgfeat.cli``);
``jobs/*.py`` call ``main`` with a fixed command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from types import ModuleType
from typing import Any

from imgfeat.config import Config, ConfigError, load_config

# Sub-commands, in help order; each is a module imgfeat.cli.<name>.
COMMAND_NAMES = ("extract", "audit", "train", "finetune", "compare", "predict", "serve", "bench")


def _commands() -> dict[str, ModuleType]:
    found = {}
    for name in COMMAND_NAMES:
        try:
            found[name] = importlib.import_module(f"imgfeat.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"imgfeat.cli.{name}":
                raise
    return found


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML settings file (repeatable; later wins)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting, e.g. --set inference.batch_size=64")
    parser.add_argument("--master", help="Spark master when not started by spark-submit (default local[*])")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgfeat", description="Transfer learning for medical images on Spark")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _commands().items():
        p = sub.add_parser(name, help=getattr(module, "HELP", None))
        module.add_arguments(p)
        _common(p)
    return parser


def config_from_args(a: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = _commands()[a.command].overrides(a)
    if a.master:
        overrides["spark.master"] = a.master
    cfg = load_config(a.config, overrides, a.set)
    check_names(cfg)
    return cfg


def check_names(cfg: Config) -> None:
    """Check the names that registries own (backbones, heads): config itself knows none of them."""
    from imgfeat.backbones.registry import engine_for, get_backbone
    from imgfeat.train.heads import check_heads

    engine_for(get_backbone(cfg.model.name), cfg.inference.engine)
    check_heads(cfg.train.heads)


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
        result = _commands()[a.command].run(a, cfg)
    except (ConfigError, ValueError, RuntimeError, FileNotFoundError) as exc:
        if a.verbose:
            raise
        print(f"imgfeat {a.command}: error: {exc}", file=sys.stderr)
        return 2
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
