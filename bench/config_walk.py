"""How the settings travel: the modules that receive the job's ``Config`` (or a part of it) on the driver, in call order.

    python bench/config_walk.py [--job extract|finetune|predict|train|all]

Traces every Python call on the driver (``sys.settrace``) whose arguments include the job's Config object or one of
its sections (``cfg.input``, ``cfg.preprocess``, ...), on a small generated folder, and prints per job:
- modules: the imgfeat modules such calls enter;
- climbs: calls carrying the settings from a module of a lower layer into one of a higher layer
  (tests/test_layout.py's order), i.e. settings handed back up the data's walk;
- re-entries: calls into a module the walk had already left;
- the modules whose functions receive the whole Config (not just the section they read).
Fewer of all three means settings that travel once, one way. Counts, not timings: repeatable.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

LAYERS = ["config", "jvm_archive", "session", "standalone", "store", "io", "backbones", "engines", "featurize", "compat",
          "scoring", "train", "finetune", "serve", "bench", "demo", "cli"]


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


class Walk:
    """Records the modules entered by calls that carry one of ``watched`` (by identity)."""

    def __init__(self, cfg: Any):
        self.whole = id(cfg)
        self.ids = {id(cfg)} | {id(getattr(cfg, f)) for f in vars(cfg)}
        self.sequence: list[str] = []
        self.whole_config: set[str] = set()  # modules whose functions receive the whole Config
        self.upward: list[str] = []  # calls carrying settings from a lower layer's module into a higher one

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        if event != "call":
            return None
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("imgfeat.") or module.startswith("imgfeat.config"):
            return None
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        carried = {id(frame.f_locals.get(n)) for n in names}
        carries = bool(carried & self.ids)
        if self.whole in carried:
            self.whole_config.add(module)
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back is not None else ""
        if carries and caller.startswith("imgfeat.") and _layer(module) > _layer(caller):
            self.upward.append(f"{caller} -> {module}")
        if carries and (not self.sequence or self.sequence[-1] != module):
            self.sequence.append(module)
        return None

    def counts(self) -> dict[str, Any]:
        seen: set[str] = set()
        climbs, reentries = len(self.upward), 0
        for cur in self.sequence:
            if cur in seen:
                reentries += 1
            seen.add(cur)
        return {"modules": len(seen), "climbs": climbs, "re_entries": reentries, "sequence": self.sequence,
                "whole_config": sorted(self.whole_config), "upward": self.upward}


def _traced(fn: Any, cfg: Any) -> dict[str, Any]:
    walk = Walk(cfg)
    sys.settrace(walk)
    try:
        fn(cfg)
    finally:
        sys.settrace(None)
    return walk.counts()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default="all", choices=["extract", "finetune", "predict", "train", "all"])
    p.add_argument("--verbose", action="store_true", help="print the module sequence too")
    a = p.parse_args(argv)
    from imgfeat.config import load_config
    from imgfeat.demo.samples import make_samples
    from imgfeat.featurize.extract import run_extract
    from imgfeat.session import get_spark

    from conftest import tiny_config

    tmp = tempfile.mkdtemp(prefix="imgfeat-walk-")
    images = make_samples(os.path.join(tmp, "images"), per_class=8, seed=1)
    store = "sqlite:///" + os.path.join(tmp, "mlflow.db")
    spark = get_spark(load_config(sets=["spark.master=local[2]", "spark.conf={spark.ui.enabled: 'false'}"]))
    features = os.path.join(tmp, "features")
    jobs: dict[str, Any] = {}
    jobs["extract"] = (lambda c: run_extract(spark, c), tiny_config(images.root, features, "input.split.mode=hash"))
    if a.job in ("finetune", "all"):
        from imgfeat.finetune.run import run_finetune

        jobs["finetune"] = (lambda c: run_finetune(spark, c), load_config(
            overrides={"input.path": images.root, "finetune.output": os.path.join(tmp, "ft"), "model.name": "tiny_torch",
                       "model.weights": "none", "input.split.mode": "hash", "mlflow.tracking_uri": store},
            sets=["finetune.epochs=1", "finetune.num_processes=1", "finetune.batch_size=8"]))
    for name, (fn, cfg) in jobs.items():
        if a.job not in (name, "all") and name != "extract":
            continue
        counts = _traced(fn, cfg) if a.job in (name, "all") else (fn(cfg) and None)
        if counts:
            print(f"{name}: {counts['modules']} modules, {counts['climbs']} climbs back up, {counts['re_entries']} re-entries; "
                  f"the whole Config reaches {len(counts['whole_config'])}: {', '.join(counts['whole_config'])}")
            for edge in counts["upward"]:
                print(f"   climb: {edge}")
            if a.verbose:
                print("   " + " -> ".join(m.removeprefix("imgfeat.") for m in counts["sequence"]))
    spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
