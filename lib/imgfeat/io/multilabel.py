"""Multi-label targets from a manifest: ``labels`` (the positive findings) and ``label_mask`` (the unknown ones).

Two manifest shapes, as the large public chest X-ray sets ship them:
- a delimited findings column (NIH ChestX-ray14's ``Finding Labels``: ``Cardiomegaly|Effusion``, ``No Finding``):
  every finding not named is negative, nothing is unknown;
- one column per finding (CheXpert, MIMIC-CXR): ``1`` positive, ``0`` negative, ``-1`` uncertain, blank not
  mentioned. Uncertain values follow the policy (``ignore``: unknown, out of that finding's loss and metrics;
  ``zeros``; ``ones``: the CheXpert paper's U-Ignore, U-Zeros, U-Ones); blanks are negative (``zeros``, as the
  CheXpert paper reads "not mentioned") or unknown (``ignore``).
Values outside 1 / 0 / -1 / blank, or findings outside the declared list, stop the job with the manifest's rows
named (``check_findings``): a silent drop or a guess would train on wrong targets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
BLANK_POLICIES = ("zeros", "ignore")
EXAMPLES = 5  # bad manifest rows named in an error


class ManifestValueError(ValueError):
    """A manifest row holds a value or a finding it must not; the message names rows and values."""


@dataclass(frozen=True)
class FindingsSpec:
    """How to read findings from a manifest (``input.label.multi`` / ``input.label.findings``)."""

    findings: tuple[str, ...] = ()  # the finding names (columns, or the delimited vocabulary); () = from the data
    column: str | None = None  # the delimited column (NIH's "Finding Labels"); None = one column per finding
    sep: str = "|"
    none_value: str | None = "No Finding"  # the delimited column's value for an image with no finding
    uncertain: str = "ignore"  # -1 in a per-finding column: ignore | zeros | ones
    blank: str = "zeros"  # blank in a per-finding column: zeros | ignore

    def __post_init__(self) -> None:
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"input.label.uncertain={self.uncertain!r}: use one of {', '.join(UNCERTAIN_POLICIES)}")
        if self.blank not in BLANK_POLICIES:
            raise ValueError(f"input.label.blank={self.blank!r}: use one of {', '.join(BLANK_POLICIES)}")
        if self.column is None and not self.findings:
            raise ValueError("multi-label input needs input.label.multi.column (a delimited findings column) or "
                             "input.label.findings (one manifest column per finding)")

    @property
    def delimited(self) -> bool:
        return self.column is not None

    def required_columns(self) -> list[str]:
        return [self.column] if self.column is not None else list(self.findings)

    @property
    def policy(self) -> str:
        """How the targets were read, as the features table's ``label_policy`` records it (train and finetune log
        it with their runs: a U-Ones model is not a U-Ignore model)."""
        if self.delimited:
            return f"delimited {self.column!r} sep {self.sep!r}: findings not named are negative"
        return f"uncertain={self.uncertain}; blank={self.blank}"


def _tokens(column: str, sep: str, none_value: str | None) -> Column:
    from pyspark.sql import functions as F

    parts = F.transform(F.split(F.coalesce(F.col(f"`{column}`"), F.lit("")), re.escape(sep)), lambda t: F.trim(t))
    kept = F.filter(parts, lambda t: (t != F.lit("")) & (t != F.lit(none_value or "")))
    return F.array_sort(F.array_distinct(kept))


def vocabulary(manifest: DataFrame, spec: FindingsSpec) -> list[str]:
    """The finding names: the declared ones, else (delimited) every finding the column names, sorted."""
    from pyspark.sql import functions as F

    if spec.findings:
        return list(spec.findings)
    rows = manifest.select(F.explode(_tokens(spec.column or "", spec.sep, spec.none_value)).alias("f")).distinct()
    return sorted(r["f"] for r in rows.collect())


def _value(column: str) -> Column:
    """A per-finding cell as -1, 0, 1, or null (blank); 9 for anything else (caught by ``check_findings``)."""
    from pyspark.sql import functions as F

    text = F.trim(F.col(f"`{column}`").cast("string"))
    number = text.try_cast("double") if hasattr(text, "try_cast") else text.cast("double")
    return (F.when(text.isNull() | (text == ""), F.lit(None))
            .when(number.isin(-1.0, 0.0, 1.0), number.cast("int")).otherwise(F.lit(9)))


def _per_finding_columns(spec: FindingsSpec) -> tuple[Column, Column]:
    """(labels, label_mask) from one column per finding, under the uncertain and blank policies."""
    from pyspark.sql import functions as F

    positive, unknown = [], []
    for name in spec.findings:
        v = _value(name)
        is_pos = (v == 1) | ((v == -1) & F.lit(spec.uncertain == "ones"))
        is_unknown = ((v == -1) & F.lit(spec.uncertain == "ignore")) | (v.isNull() & F.lit(spec.blank == "ignore"))
        positive.append(F.when(F.coalesce(is_pos, F.lit(False)), F.lit(name)))
        unknown.append(F.when(F.coalesce(is_unknown, F.lit(False)), F.lit(name)))
    keep = lambda arr: F.filter(F.array(*arr), lambda x: x.isNotNull())  # noqa: E731
    return keep(positive), keep(unknown)


def with_findings(manifest: DataFrame, spec: FindingsSpec, names: list[str]) -> DataFrame:
    """``manifest`` plus ``labels`` (sorted positive findings) and ``label_mask`` (findings unknown for the row)."""
    from pyspark.sql import functions as F

    if spec.delimited:
        return manifest.withColumn("labels", _tokens(spec.column or "", spec.sep, spec.none_value)).withColumn(
            "label_mask", F.array().cast("array<string>"))
    labels, mask = _per_finding_columns(FindingsSpec(tuple(names), None, spec.sep, spec.none_value, spec.uncertain,
                                                     spec.blank))
    return manifest.withColumn("labels", labels).withColumn("label_mask", mask)


def _bad_rows(manifest: DataFrame, spec: FindingsSpec, names: list[str]) -> list[str]:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    # The file's line (header = line 1): a CSV is read in order, which monotonically_increasing_id keeps.
    numbered = manifest.withColumn("_row", F.row_number().over(Window.orderBy(F.monotonically_increasing_id())) + 1)
    if spec.delimited:
        unknown = F.array_except(_tokens(spec.column or "", spec.sep, spec.none_value), F.array(*map(F.lit, names)))
        bad = numbered.filter(F.size(unknown) > 0).select("_row", "rel_path", F.array_join(unknown, ", ").alias("v"))
        return [f"line {r['_row']} ({r['rel_path']}): unknown finding(s) {r['v']} (known: {', '.join(names)})"
                for r in bad.orderBy("_row").limit(EXAMPLES).collect()]
    checks = [F.when(_value(n) == 9, F.concat(F.lit(f"{n}="), F.col(f"`{n}`").cast("string"))) for n in names]
    bad = numbered.select("_row", "rel_path", F.concat_ws("; ", *checks).alias("v")).filter(F.col("v") != "")
    return [f"line {r['_row']} ({r['rel_path']}): {r['v']} (values must be 1, 0, -1 or blank)"
            for r in bad.orderBy("_row").limit(EXAMPLES).collect()]


def check_findings(manifest: DataFrame, spec: FindingsSpec, names: list[str], source: str) -> None:
    """Raise ManifestValueError naming the manifest's rows with unknown findings or values (up to EXAMPLES)."""
    missing = [c for c in spec.required_columns() if c not in manifest.columns]
    if missing:
        raise ManifestValueError(f"label manifest {source}: missing column(s) {', '.join(missing)}; it has "
                                 f"{', '.join(manifest.columns)}")
    problems = _bad_rows(manifest, spec, names)
    if problems:
        raise ManifestValueError(f"label manifest {source}: rows with values that cannot be read as findings (the "
                                 "first shown): " + " | ".join(problems))
