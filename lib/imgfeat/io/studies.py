"""Which images form one study (``study_id``): a manifest column (input.study.column), a regex on the relative path
(input.study.pattern), or for DICOM files their own study (``study_key``, filled in by extract once each file is
read). A study belongs to one patient: images of one study with different groups stop the job
(``check_study_patients``), since a per-study result or a split by study would mix two patients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgfeat.io.root import InputError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from imgfeat.config.schema import InputConfig

EXAMPLES = 5  # studies named in an error
FILES_SHOWN = 4  # files named per study


def wants_study_id(inp: InputConfig) -> bool:
    """Rows carry ``study_id`` when input.study is set or the labels are multi-label; other tables keep the
    columns they always had."""
    return inp.study.configured or inp.label.is_multi


def with_study(images: DataFrame, inp: InputConfig) -> DataFrame:
    """``study_id`` (when ``wants_study_id``): the manifest's study column, else input.study.pattern's capture
    group on ``rel_path`` (null when neither gives one; DICOM files get their study_key later)."""
    from pyspark.sql import functions as F

    if not wants_study_id(inp):
        return images
    sources = []
    if inp.study.column:
        sources.append(F.col("manifest_study"))
    if inp.study.pattern:
        found = F.regexp_extract(F.col("rel_path"), inp.study.pattern, 1)
        sources.append(F.when(found != "", found))
    study = F.coalesce(*sources) if sources else F.lit(None)
    out = images.withColumn("study_id", study.cast("string"))
    return out.drop("manifest_study") if "manifest_study" in out.columns else out


def check_study_patients(images: DataFrame) -> None:
    """Raise InputError naming the studies (up to EXAMPLES) whose images carry different groups (patients), with
    some of their files; images without a study or a group are not compared."""
    from pyspark.sql import functions as F

    known = images.filter(F.col("study_id").isNotNull() & F.col("group_id").isNotNull())
    files = F.concat(F.col("rel_path"), F.lit(" ("), F.col("group_id"), F.lit(")"))
    mixed = (known.groupBy("study_id")
             .agg(F.array_sort(F.collect_set("group_id")).alias("patients"),
                  F.slice(F.array_sort(F.collect_list(files)), 1, FILES_SHOWN).alias("files"))
             .filter(F.size("patients") > 1)
             .orderBy("study_id").limit(EXAMPLES).collect())
    if mixed:
        shown = "; ".join(f"study {r['study_id']!r}: patients {', '.join(r['patients'])} in {', '.join(r['files'])}"
                          for r in mixed)
        raise InputError(
            f"a study holds images of more than one patient (group_id): {shown}. A study belongs to one patient: fix "
            "the study key (input.study.column / input.study.pattern) or the patient key (input.split.group, "
            "group_pattern, group_source, group_column), or the manifest rows")
