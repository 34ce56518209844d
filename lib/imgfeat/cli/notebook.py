"""Notebook glue: Databricks widgets -> the CLI's own arguments -> a validated config.

Each notebook in ``notebooks/`` declares the widgets of one sub-command (``declare_widgets``), reads them
(``widget_configs``) and calls the library (``run_extract``, ``run_train``, ``run_compare``). Widget values are
turned into the same argument list ``imgfeat <command>`` takes and parsed by ``imgfeat.cli.build_parser``, so a
notebook task, the CLI and ``spark-submit jobs/...`` accept exactly the same settings and fail the same way.

Widgets named like a CLI flag (``batch_size`` -> ``--batch-size``) pass their value through; an empty value
means "not given" (the config files and defaults apply). Three are notebook conveniences:

- ``output_root``: a folder or a Unity Catalog ``catalog.schema``; the features table is ``<root>/features``
  or ``catalog.schema.features`` (``--output`` for extract, ``--features`` for train) unless given explicitly;
- ``model`` (extract): several backbones, comma-separated: one extract run each;
- ``config`` (comma-separated files) and ``set`` (``key=value`` items separated by ``;`` or new lines): repeated.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from dataclasses import dataclass
from typing import Any

from imgfeat.config import Config
from imgfeat.store.tables import location_in

FEATURES_TABLE = "features"
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"


@dataclass(frozen=True)
class Widget:
    name: str
    default: str = ""
    label: str = ""


_CONFIG = Widget("config", "", "Settings files (YAML), comma-separated")
_SET = Widget("set", "", "Overrides key=value; separated by ;")
_EXPERIMENT = Widget("experiment", "", "MLflow experiment, e.g. /Users/you@example.com/imgfeat")
_TRACKING = Widget("tracking_uri", "", "MLflow tracking URI (databricks on Databricks)")

WIDGETS: dict[str, tuple[Widget, ...]] = {
    "extract": (
        Widget("input", "", "Image folder (/Volumes/..., dbfs:/..., s3://...)"),
        Widget("output_root", "", "Output: folder or catalog.schema"),
        Widget("output", "", "Features table (default <output_root>/features)"),
        Widget("model", "efficientnet_lite0,resnet50,inception_v3", "Backbones, comma-separated"),
        Widget("engine", "auto", "Engine: auto | keras | torch"),
        Widget("weights", "imagenet", "Weights: imagenet | none | file"),
        Widget("format", "auto", "Table format: auto | delta | parquet"),
        Widget("mode", "incremental", "incremental | overwrite"),
        Widget("batch_size", "", "Images per model call (GPU: 128)"),
        Widget("split_mode", "", "Train/test column: none | hash | folder"),
        _CONFIG,
        _SET,
    ),
    "train": (
        Widget("output_root", "", "Output: folder or catalog.schema"),
        Widget("features", "", "Features table (default <output_root>/features)"),
        Widget("heads", "lr,rf,dt", "Heads, comma-separated"),
        _EXPERIMENT,
        _TRACKING,
        Widget("test_fraction", "", "Held-out share, e.g. 0.2"),
        Widget("cv_folds", "", "Cross-validation folds (0 = none)"),
        Widget("register", "", "Register the best model under this name"),
        _CONFIG,
        _SET,
    ),
    "finetune": (
        Widget("input", "", "Image folder (/Volumes/..., dbfs:/..., s3://...)"),
        Widget("output", "", "Shared folder for the decoded table and checkpoints (/dbfs/... or /Volumes/...)"),
        Widget("model", "efficientnet_lite0", "PyTorch backbone"),
        Widget("weights", "imagenet", "Initial weights: imagenet | none | .pth file"),
        Widget("split_mode", "folder", "Train/test: none | hash | folder"),
        Widget("epochs", "", "Epochs"),
        Widget("train_layers", "", "head | last:K | all"),
        Widget("num_processes", "", "Training processes (one per GPU with use_gpu)"),
        Widget("precision", "", "fp32 | bf16"),
        _EXPERIMENT,
        _TRACKING,
        _CONFIG,
        _SET,
    ),
    "compare": (
        _EXPERIMENT,
        Widget("positive_class", "", "Class whose precision/recall/F1 are shown"),
        _TRACKING,
        _CONFIG,
        _SET,
    ),
}

# Widgets that are not a CLI flag of the same name (see the module docstring).
NOTEBOOK_ONLY = {"output_root"}
# output_root fills this flag when it is not given explicitly.
ROOT_TARGET = {"extract": "output", "train": "features"}


def _widgets(command: str) -> tuple[Widget, ...]:
    try:
        return WIDGETS[command]
    except KeyError:
        raise ValueError(f"no notebook widgets for command {command!r}; known: {', '.join(WIDGETS)}") from None


def declare_widgets(dbutils: Any, command: str) -> None:
    """Create the command's text widgets (a job's parameters, or the defaults, fill them)."""
    for w in _widgets(command):
        dbutils.widgets.text(w.name, w.default, w.label or w.name)


def widget_values(dbutils: Any, command: str) -> dict[str, str]:
    return {w.name: (dbutils.widgets.get(w.name) or "").strip() for w in _widgets(command)}


def _split(value: str, separators: str) -> list[str]:
    return [v.strip() for v in re.split(f"[{separators}]", value) if v.strip()]


def features_location(output_root: str) -> str:
    """Where extract writes and train reads the features table under an output root."""
    return location_in(output_root, FEATURES_TABLE)


def argv_from_values(command: str, values: dict[str, str]) -> list[list[str]]:
    """Widget values -> CLI argument lists (``[command, --flag, value, ...]``); one per backbone for extract."""
    known = {w.name for w in _widgets(command)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {command} widget(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {k: (v or "").strip() for k, v in values.items()}
    root = values.get("output_root", "")
    target = ROOT_TARGET.get(command)
    if target and root and not values.get(target):
        values[target] = features_location(root)
    args: list[str] = [command]
    models = [""]
    for name in (w.name for w in _widgets(command)):  # in declaration order
        value = values.get(name, "")
        if not value or name in NOTEBOOK_ONLY:
            continue
        if name == "config":
            for item in _split(value, ","):
                args += ["--config", item]
        elif name == "set":
            for item in _split(value, ";\n"):
                args += ["--set", item]
        elif name == "model" and command == "extract":
            models = _split(value, ",") or [""]
        else:
            args += ["--" + name.replace("_", "-"), value]
    return [args + (["--model", m] if m else []) for m in models]


def parse_argv(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    """Parse with the CLI's own parser; bad arguments raise ``ValueError`` with argparse's message."""
    from imgfeat.cli import build_parser, config_from_args

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = build_parser().parse_args(argv)
    except SystemExit:  # argparse exits on errors; in a notebook an exception that says why is better
        lines = errors.getvalue().strip().splitlines()
        raise ValueError(lines[-1] if lines else f"invalid arguments: {argv}") from None
    return args, config_from_args(args)


def widget_configs(dbutils: Any, command: str) -> list[Config]:
    """Read the widgets and build one validated config per run (extract: per backbone)."""
    return [parse_argv(argv)[1] for argv in argv_from_values(command, widget_values(dbutils, command))]


# ---------------------------------------------------------------------------------------------
# results and links


def results_frame(results: list[Any]) -> Any:
    """A pandas DataFrame with one row per result (anything with ``to_dict()``)."""
    import pandas as pd

    return pd.DataFrame([r.to_dict() for r in results])


def tracking_uri(cfg: Config) -> str:
    """The MLflow store the notebook's runs go to (imgfeat.train.tracking's rule)."""
    from imgfeat.train.tracking import tracking_uri as configured

    return configured(cfg.mlflow)


def workspace_url(spark: Any) -> str | None:
    """``https://<workspace>`` on Databricks, else None."""
    try:
        host = spark.conf.get("spark.databricks.workspaceUrl", None)
    except Exception:
        return None
    if not host:
        return None
    return host if host.startswith("http") else f"https://{host}"


def run_url(experiment_id: str, run_id: str, host: str | None = None) -> str:
    """Link to a run: the Databricks workspace UI, or the local ``mlflow ui``."""
    if host:
        return f"{host.rstrip('/')}/ml/experiments/{experiment_id}/runs/{run_id}"
    return f"{LOCAL_MLFLOW_UI}/#/experiments/{experiment_id}/runs/{run_id}"


def with_run_links(table: Any, cfg: Config, host: str | None = None) -> Any:
    """Add ``run_id`` and ``run_url`` to a comparison table (rows: backbone x head).

    Uses the table's ``run_id`` column when it has one, else the newest run of the experiment tagged with
    the row's ``backbone`` and ``head``. Rows without a matching run get empty links.
    """
    from mlflow.tracking import MlflowClient

    out = table.copy()
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        raise ValueError(f"MLflow experiment {cfg.mlflow.experiment!r} not found at {tracking_uri(cfg)}")
    exp_id = experiment.experiment_id
    if "run_id" not in out.columns:
        newest: dict[tuple[str, str], str] = {}
        if {"backbone", "head"} <= set(out.columns):
            runs = client.search_runs([exp_id], filter_string="tags.head != ''", order_by=["attributes.start_time DESC"])
            for run in runs:
                key = (run.data.tags.get("backbone", ""), run.data.tags.get("head", ""))
                newest.setdefault(key, run.info.run_id)
            out["run_id"] = [newest.get((str(b), str(h)), "") for b, h in zip(out["backbone"], out["head"], strict=True)]
        else:
            out["run_id"] = ""
    out["run_url"] = [run_url(exp_id, r, host) if r else "" for r in out["run_id"]]
    return out


def links_html(table: Any) -> str:
    """The table as HTML with each row's run as a link (for ``displayHTML``)."""
    import html

    shown = table.drop(columns=["run_url"]).copy()
    for column in shown.columns:
        if shown[column].dtype == object:
            shown[column] = [html.escape(str(v)) for v in shown[column]]
    if "run_id" in shown.columns:
        shown["run_id"] = [
            f'<a href="{html.escape(u)}" target="_blank">{html.escape(str(r))}</a>' if u else html.escape(str(r))
            for r, u in zip(table["run_id"], table["run_url"], strict=True)
        ]
    return shown.to_html(index=False, escape=False, float_format=lambda x: f"{x:.4f}")
