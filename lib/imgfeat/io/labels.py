"""Each listed image's label (its folder, a row of the label manifest, or later a DICOM attribute), or in
multi-label mode its findings (``labels``, ``label_mask``, ``findings``, ``label_policy``: io/multilabel.py), and how labelling went
(``label_report``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgfeat.io.root import input_root

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from imgfeat.config.schema import InputConfig, LabelConfig
    from imgfeat.io.multilabel import FindingsSpec

# The columns a multi-label listing adds (the features table's contract, docs/labels.md).
MULTI_COLUMNS = ("labels", "label_mask", "findings", "label_policy")


def folder_at(level: int) -> Column:
    """The folder ``level`` steps above the file (1 = its parent), or null when the path is shallower."""
    from pyspark.sql import functions as F

    parts = F.split(F.col("rel_path"), "/")
    return F.when(F.size(parts) > level, F.element_at(parts, -1 - level)).otherwise(F.lit(None))


def folder_label(label: LabelConfig) -> Column:
    """The folder at label.folder_level, or the capture group of label.folder_pattern in its name (null when the
    pattern does not match: the image is unlabelled, and reported)."""
    from pyspark.sql import functions as F

    folder = folder_at(label.folder_level)
    if label.folder_pattern is None:
        return folder
    found = F.regexp_extract(folder, label.folder_pattern, 1)
    return F.when(found != "", found)


def findings_spec(label: LabelConfig) -> FindingsSpec:
    """input.label's multi-label settings as io.multilabel's FindingsSpec."""
    from imgfeat.io.multilabel import FindingsSpec

    return FindingsSpec(tuple(label.findings), label.multi.column, label.multi.sep, label.multi.none_value,
                        label.uncertain, label.blank)


def manifest_findings(spark: SparkSession, inp: InputConfig) -> list[str]:
    """The task's finding names (declared, else every one the delimited column names), after checking every
    manifest row: unknown findings or values stop the job naming the manifest's lines (ManifestValueError)."""
    from pyspark.sql import functions as F

    from imgfeat.io.manifest import load_manifest
    from imgfeat.io.multilabel import check_findings, vocabulary

    spec = findings_spec(inp.label)
    raw = load_manifest(spark, inp)
    names = vocabulary(raw, spec)
    if spec.delimited and not spec.findings:
        return names  # every finding the column names is known: nothing to check (a pass over the manifest saved)
    written = raw.withColumn("rel_path", F.col(f"`{inp.label.path_column}`").cast("string"))
    check_findings(written, spec, names, repr(inp.label.manifest))
    return names


def read_manifest(spark: SparkSession, inp: InputConfig, root: str, names: list[str] | None = None) -> DataFrame:
    """The label manifest, one row per path as written (``_key``, ``_bare``: io.manifest.with_keys), with
    ``manifest_label`` (single-label) or ``labels`` and ``label_mask`` (multi-label, over the finding ``names``;
    none when ``names`` is None),
    and ``manifest_group`` / ``manifest_study`` when input.split.group_column / input.study.column name them."""
    from pyspark.sql import functions as F

    from imgfeat.io.manifest import load_manifest, with_keys
    from imgfeat.io.multilabel import with_findings

    manifest = with_keys(load_manifest(spark, inp), inp, root)
    cols: list[Column | str] = ["_key", "_bare"]
    if inp.label.is_multi:
        if names is not None:  # None: the rows' paths only (label_report)
            manifest = with_findings(manifest, findings_spec(inp.label), names)
            cols += ["labels", "label_mask"]
    else:
        cols.append(F.col("label").cast("string").alias("manifest_label"))
    group_column = inp.split.group_column if inp.split.group == "manifest_column" else None
    if group_column:
        cols.append(F.col(f"`{group_column}`").cast("string").alias("manifest_group"))
    if inp.study.column:
        cols.append(F.col(f"`{inp.study.column}`").cast("string").alias("manifest_study"))
    return manifest.select(*cols).dropDuplicates(["_key"])


def with_label(spark: SparkSession, images: DataFrame, inp: InputConfig, root: str) -> DataFrame:
    """``label`` by input.label's mode (null for none and dicom_tag: extract sets those from each decoded file, and
    for multi-label rows, which carry ``labels``, ``label_mask`` and ``findings`` instead); manifest labels bring
    the manifest's group and study columns along (``manifest_group``, ``manifest_study``) for ``groups.with_group``
    and ``studies.with_study``. A manifest is checked here, before anything is read: bad findings, ambiguous file
    names."""
    from pyspark.sql import functions as F

    from imgfeat.io.manifest import check_unique_names, resolve

    mode = inp.label.effective_mode
    if mode in ("none", "dicom_tag"):  # dicom_tag: set from each file's attribute when it is decoded
        return images.withColumn("label", F.lit(None).cast("string"))
    if mode == "folder":
        return images.withColumn("label", folder_label(inp.label))
    names = manifest_findings(spark, inp) if inp.label.is_multi else None
    manifest = read_manifest(spark, inp, root, names)
    check_unique_names(manifest, images, str(inp.label.manifest))
    matched = resolve(manifest, images).filter(F.col("rel_path").isNotNull()).drop("_key", "_bare")
    labelled = images.join(matched.dropDuplicates(["rel_path"]), on="rel_path", how="left")
    if names is None:
        return labelled.withColumnRenamed("manifest_label", "label")
    findings = F.array(*[F.lit(n) for n in names]).cast("array<string>")
    return labelled.withColumn("label", F.lit(None).cast("string")).withColumn("findings", findings).withColumn(
        "label_policy", F.lit(findings_spec(inp.label).policy))


def label_report(spark: SparkSession, inp: InputConfig, images: DataFrame) -> dict[str, int]:
    """How listing and labelling went, in one pass over ``images``: the images listed, those without a label (or,
    multi-label, without findings), (with a grouped split) those whose group could not be found (each is then its
    own group), (with input.study set) those whose study could not be found, and label-manifest rows that match no
    listed image (a second job, manifest labels only)."""
    from pyspark.sql import functions as F

    from imgfeat.io.manifest import unmatched_count

    mode = inp.label.effective_mode
    counts = [F.count(F.lit(1)).alias("listed")]
    if mode != "none":
        target = "labels" if inp.label.is_multi else "label"
        counts.append(F.count_if(F.col(target).isNull()).alias("unlabelled"))
    if inp.split.group != "none":
        counts.append(F.count_if(F.col("group_id").isNull()).alias("ungrouped"))
    if inp.study.configured:
        counts.append(F.count_if(F.col("study_id").isNull()).alias("no_study"))
    row = images.agg(*counts).first().asDict()
    report = {"listed": row["listed"], "unlabelled": row.get("unlabelled") or 0, "manifest_unmatched": 0,
              "ungrouped": row.get("ungrouped") or 0, "no_study": row.get("no_study") or 0}
    if mode == "manifest":
        root = input_root(spark, inp.path)
        report["manifest_unmatched"] = unmatched_count(read_manifest(spark, inp, root), images)
    return report
