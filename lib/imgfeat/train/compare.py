"""Compare the child runs of a ``train`` call: a table sorted best first, logged to the parent run.

Multi-label runs (parent param ``task`` = multi) are compared by macro and micro AUC and each finding's AUC
(sorted by ``test_auc_macro`` unless another metric is asked for), and the best run's per-finding table (its
``findings.csv``) is printed and logged next to the comparison (``comparison_findings.csv``/``.md``).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

from imgfeat.config import Config
from imgfeat.train.metrics import metric_key

if TYPE_CHECKING:
    import pandas as pd


def latest_parent_run(client: Any, experiment_id: str) -> Any:
    """The most recent ``train`` parent run of the experiment."""
    runs = client.search_runs(
        [experiment_id], filter_string="tags.`imgfeat.kind` = 'train'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        raise ValueError("the experiment has no `imgfeat train` run yet; run `imgfeat train --features PATH` first")
    return runs[0]


def multilabel_columns(findings: list[str], levels: list[str]) -> dict[str, str]:
    """The comparison's columns for a multi-label train call: column -> metric."""
    from imgfeat.train.metrics import finding_key

    shown = {"auc_macro": "test_auc_macro", "auc_micro": "test_auc_micro"}
    shown.update({f"{level}_auc_macro": f"{level}_test_auc_macro" for level in levels})
    shown.update({f"auc_{f}": f"test_auc_{finding_key(f)}" for f in findings})
    return shown


def comparison_table(children: list[Any], positive: str | None, sort_by: str = "test_f1_macro",
                     shown: dict[str, str] | None = None, intervals: set[str] | None = None) -> pd.DataFrame:
    """One row per child run: rank | backbone | head | accuracy | precision/recall/F1 of ``positive`` | macro F1 |
    kappa | AUC, each with its bootstrap interval (``<column>_ci``), then the specificity at the target
    sensitivity (binary) and the calibration error, best first.

    ``shown``: other columns (column -> metric; multi-label: ``multilabel_columns``), ``intervals``: the columns
    that get a ``_ci`` column (default all).

    ``rank``: runs whose intervals of ``sort_by`` overlap the interval of the best run of their rank share it
    (a tie: the data cannot tell them apart); the next run whose interval lies wholly below starts the next rank.
    """
    import pandas as pd

    key = metric_key(str(positive))
    single = shown is None
    shown = shown or {
        "accuracy": "test_accuracy", f"precision_{positive}": f"test_precision_{key}",
        f"recall_{positive}": f"test_recall_{key}", f"f1_{positive}": f"test_f1_{key}", "f1_macro": "test_f1_macro",
        "kappa": "test_kappa", "auc": "test_roc_auc",
    }
    rows = []
    for run in children:
        m = run.data.metrics
        row: dict[str, Any] = {"backbone": run.data.tags.get("backbone", "?"), "head": run.data.tags.get("head", "?")}
        for column, name in shown.items():
            row[column] = m.get(name)
            if intervals is not None and column not in intervals:
                continue
            low, high = m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
            row[f"{column}_ci"] = f"{low:.3f}-{high:.3f}" if low is not None and high is not None else ""
        if single:  # binary: the specificity left at the target sensitivity (train.validity.target_sensitivity)
            row["specificity_at_target_sensitivity"] = m.get("test_specificity_at_target_sensitivity")
            row["ece"] = m.get("test_ece")
        row.update({"run_id": run.info.run_id, "_sort": m.get(sort_by), "_low": m.get(f"{sort_by}_ci_low"),
                    "_high": m.get(f"{sort_by}_ci_high")})
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    second = "accuracy" if single else "auc_micro"
    table = table.sort_values(["_sort", second, "backbone", "head"], ascending=[False, False, True, True],
                              na_position="last").reset_index(drop=True)
    ranks, rank, leader_low = [], 0, None
    for i, row in table.iterrows():
        overlaps = leader_low is not None and row["_high"] == row["_high"] and row["_high"] is not None and row["_high"] >= leader_low
        if not overlaps:
            rank, leader_low = i + 1, row["_low"] if row["_low"] == row["_low"] else None
        ranks.append(rank)
    table.insert(0, "rank", ranks)
    return table.drop(columns=["_sort", "_low", "_high"])


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-style Markdown table (numbers with 4 decimals)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if v != v else f"{v:.4f}"
        return str(v)

    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def bar_chart(table: pd.DataFrame, positive: str, title: str) -> Any:
    """Grouped bars per backbone x head: accuracy, F1 of the positive class, macro F1, AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = [s for s in ("accuracy", f"f1_{positive}", "f1_macro", "auc", "auc_macro", "auc_micro") if s in table.columns]
    names = [f"{b}\n{h}" for b, h in zip(table["backbone"], table["head"], strict=True)]
    x = np.arange(len(names))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.5))
    for i, s in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, table[s].astype(float).fillna(0.0), width, label=s)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=len(series), loc="lower center")
    fig.tight_layout()
    return fig


def run_compare(cfg: Config, parent_run_id: str | None = None) -> pd.DataFrame:
    """The comparison table of the latest (or the given) ``train`` run of ``mlflow.experiment``.

    Also logs ``comparison.md``, ``comparison.csv`` and ``comparison.png`` to that parent run.
    """
    from mlflow.tracking import MlflowClient

    from imgfeat.train.tracking import use_experiment

    experiment_id = use_experiment(cfg.mlflow, create=False)
    client = MlflowClient()
    parent = client.get_run(parent_run_id) if parent_run_id else latest_parent_run(client, experiment_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=5000
    )
    if not children:
        raise ValueError(f"train run {parent.info.run_id} has no child runs (did it fail? see the MLflow UI)")
    labels = json.loads(parent.data.params.get("labels", "[]"))
    multi = parent.data.params.get("task") == "multi"
    sort_by = cfg.train.select_metric
    if multi:
        positive = None
        sort_by = "test_auc_macro" if sort_by == "test_f1_macro" else sort_by
        level = parent.data.params.get("aggregate")
        shown = multilabel_columns(labels, [level] if level else [])
        table = comparison_table(children, None, sort_by, shown, {c for c in shown if not c.startswith("auc_")} |
                                 {"auc_macro", "auc_micro"})
    else:
        positive = cfg.train.positive_class or (labels[-1] if labels else None)
        if positive is None or (labels and positive not in labels):
            raise ValueError(f"positive class {positive!r} is not one of the trained labels {labels}; pass --positive-class")
        table = comparison_table(children, positive, sort_by)
    _log_comparison(client, parent, table, positive, sort_by)
    findings = best_findings(client, parent.info.run_id, table) if multi else None
    table.attrs.update({"parent_run_id": parent.info.run_id, "positive_class": positive, "experiment_id": experiment_id,
                        "paired_test": parent.data.tags.get("paired_test", ""), "sort_by": sort_by,
                        # The best run's per-finding table as records (a DataFrame in attrs would be copied around).
                        "findings": None if findings is None else findings.to_dict(orient="records"),
                        "findings_title": None if findings is None else findings.attrs["title"]})
    return table


def _log_comparison(client: Any, parent: Any, table: pd.DataFrame, positive: str | None, sort_by: str) -> None:
    """comparison.md, .csv and .png on the parent run."""
    import matplotlib.pyplot as plt

    from imgfeat.train.privacy import check_artifact_table

    dataset = parent.data.tags.get("dataset", "")
    paired = parent.data.tags.get("paired_test", "")
    what = f"positive class {positive}" if positive is not None else "multi-label findings"
    check_artifact_table(table, "comparison.csv")
    with tempfile.TemporaryDirectory() as tmp:
        md = os.path.join(tmp, "comparison.md")
        with open(md, "w", encoding="utf-8") as fh:
            fh.write(f"# {dataset}: {what}, sorted by {sort_by}\n\n{to_markdown(table)}\n")
            fh.write("\nIntervals: 95 % bootstrap over the test images (their groups when grouped); equal ranks are ties.\n")
            if paired:
                fh.write(f"\nBest two runs, paired on the same test images: {paired}\n")
        table.to_csv(os.path.join(tmp, "comparison.csv"), index=False)
        fig = bar_chart(table, str(positive), f"{dataset} ({what})")
        fig.savefig(os.path.join(tmp, "comparison.png"), dpi=110)
        plt.close(fig)
        for name in ("comparison.md", "comparison.csv", "comparison.png"):
            client.log_artifact(parent.info.run_id, os.path.join(tmp, name))


def best_findings(client: Any, parent_run_id: str, table: pd.DataFrame) -> pd.DataFrame | None:
    """The best run's per-finding table (its findings.csv), logged to the parent as comparison_findings.csv/.md;
    None when the best run has none."""
    import pandas as pd

    if table.empty:
        return None
    best = table.iloc[0]
    try:
        path = client.download_artifacts(best["run_id"], "findings.csv")
    except Exception:  # an older run, or a failed one: no table to show
        return None
    findings = pd.read_csv(path, keep_default_na=False, dtype=str)
    title = f"best run {best['backbone']} / {best['head']} ({best['run_id']})"
    with tempfile.TemporaryDirectory() as tmp:
        findings.to_csv(os.path.join(tmp, "comparison_findings.csv"), index=False)
        with open(os.path.join(tmp, "comparison_findings.md"), "w", encoding="utf-8") as fh:
            fh.write(f"# Per finding, {title}\n\n{to_markdown(findings)}\n")
        for name in ("comparison_findings.csv", "comparison_findings.md"):
            client.log_artifact(parent_run_id, os.path.join(tmp, name))
    findings.attrs["title"] = title
    return findings
