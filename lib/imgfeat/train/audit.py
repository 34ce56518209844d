"""The leakage report: duplicates and groups across splits, class balance, labels that disagree.

Input: one row per image (path, rel_path, label, side = train | test | null, group_id, content_sha256, phash).
Exact duplicates share the SHA-256 of their bytes; near duplicates have perceptual hashes (256 bits) at most
``near_duplicate_bits`` apart, found with banding (pigeonhole: two hashes within d bits agree on at least one of
d + 1 bands), so the comparison never pairs every image with every other. Runs in Spark; only the
findings (capped lists) come to the driver.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

EXAMPLES = 20  # findings listed per kind (all are counted)


class LeakageError(ValueError):
    """The train/test split leaks (exact duplicates or shared groups across it); the message names files."""


class LabelConflictError(ValueError):
    """Identical files (same content) carry different labels; the message names the files and their labels."""


@dataclass
class AuditReport:
    images: int
    class_balance: dict[str, dict[str, int]]  # side -> label -> images
    exact_duplicate_sets: int  # contents that occur more than once
    exact_duplicate_images: int  # images in those sets
    exact_cross_split: list[dict[str, Any]] = field(default_factory=list)  # sets on both sides
    exact_cross_label: list[dict[str, Any]] = field(default_factory=list)  # sets with more than one label
    exact_cross_split_count: int = 0
    exact_cross_label_count: int = 0
    exact_examples: list[dict[str, Any]] = field(default_factory=list)  # any duplicate sets
    near_duplicate_pairs: int = 0  # pairs within near_duplicate_bits, exact duplicates excluded
    near_cross_split: list[dict[str, Any]] = field(default_factory=list)
    near_cross_label: list[dict[str, Any]] = field(default_factory=list)
    near_cross_split_count: int = 0
    near_cross_label_count: int = 0
    groups: int = 0
    groups_across_splits: list[dict[str, Any]] = field(default_factory=list)
    groups_across_splits_count: int = 0
    near_duplicate_bits: int = 12
    fingerprints: bool = True  # False: the table predates content hashes (no duplicate checks)
    split_mode: str = ""  # how the audited split was made (column | hash)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        balance = "; ".join(
            f"{side}: " + ", ".join(f"{label} {n}" for label, n in sorted(labels.items()))
            for side, labels in sorted(self.class_balance.items())
        )
        lines = [f"[imgfeat] audit: {self.images} images; class balance {balance}"]
        if not self.fingerprints:
            lines.append("[imgfeat]   no content hashes in this table (extracted before they were recorded): "
                         "re-extract (--mode overwrite) to check duplicates")
        else:
            lines.append(
                f"[imgfeat]   exact duplicates: {self.exact_duplicate_sets} contents in {self.exact_duplicate_images} "
                f"images; {self.exact_cross_split_count} across train/test, {self.exact_cross_label_count} with "
                f"differing labels")
            lines.append(
                f"[imgfeat]   near duplicates (<= {self.near_duplicate_bits} of 256 bits): {self.near_duplicate_pairs} "
                f"pairs; {self.near_cross_split_count} across train/test, {self.near_cross_label_count} with differing labels")
        lines.append(f"[imgfeat]   groups: {self.groups}; {self.groups_across_splits_count} on both sides of the split")
        for title, items in (("exact duplicates across train/test", self.exact_cross_split),
                             ("exact duplicates with differing labels", self.exact_cross_label),
                             ("near duplicates across train/test", self.near_cross_split),
                             ("near duplicates with differing labels", self.near_cross_label),
                             ("groups on both sides", self.groups_across_splits)):
            for item in items[:5]:
                lines.append(f"[imgfeat]     {title}: {describe(item)}")
        return "\n".join(lines)


def describe(item: dict[str, Any]) -> str:
    if "group_id" in item:
        return f"group {item['group_id']}: train {item['train']}, test {item['test']} (e.g. {', '.join(item['examples'][:3])})"
    if "a" in item:
        return f"{item['a']} ({item['label_a']}, {item['side_a']}) ~ {item['b']} ({item['label_b']}, {item['side_b']}), {item['bits']} bits"
    return (f"{', '.join(item['paths'][:4])} (labels {', '.join(item['labels'])}; sides "
            f"{', '.join(s or 'none' for s in item['sides'])})")


HASH_HEX = 64  # 256-bit perceptual hashes (imgfeat.io.fingerprints)


def _bands(bits: int) -> tuple[int, int]:
    """(number of bands, hex characters per band) so that hashes within ``bits`` share a band."""
    for chars in (4, 2, 1):
        if HASH_HEX // chars > bits:
            return HASH_HEX // chars, chars
    raise ValueError(f"near_duplicate_bits must be below {HASH_HEX}")


def _distance(a: str, b: str) -> Any:
    """Bits that differ between the hex hashes in columns ``a`` and ``b`` (32-bit chunks, popcount of the XOR)."""
    from pyspark.sql import functions as F

    total = F.lit(0)
    for start in range(1, HASH_HEX + 1, 8):
        x = F.conv(F.substring(F.col(a), start, 8), 16, 10).cast("long")
        y = F.conv(F.substring(F.col(b), start, 8), 16, 10).cast("long")
        total = total + F.bit_count(x.bitwiseXOR(y))
    return total


def run_audit(images: DataFrame, near_duplicate_bits: int = 12) -> AuditReport:
    """Audit ``images`` (one row per image; see the module docstring)."""
    from pyspark.sql import functions as F

    images = images.persist()
    n = images.count()
    balance: dict[str, dict[str, int]] = {}
    for r in images.groupBy("side", "label").count().collect():
        balance.setdefault(r["side"] or "none", {})[r["label"] or "(none)"] = r["count"]
    report = AuditReport(images=n, class_balance=balance, exact_duplicate_sets=0, exact_duplicate_images=0,
                         near_duplicate_bits=near_duplicate_bits)
    fingerprints = "content_sha256" in images.columns and images.filter(F.col("content_sha256").isNotNull()).limit(1).count() > 0
    report.fingerprints = fingerprints
    if fingerprints:
        _exact(images, report)
        _near(images, report, near_duplicate_bits)
    if "group_id" in images.columns:
        _groups(images, report)
    images.unpersist()
    return report


def duplicate_sets(images: DataFrame) -> DataFrame:
    """Contents that more than one file holds. ``images``: path, rel_path, label, side, content_sha256 (one row per
    image or slice). One row per content: n, paths, labels, sides, members (rel_path, label), crosses_split,
    crosses_label."""
    from pyspark.sql import functions as F

    # One row per file here: the slices of one volume share its content and are not duplicates of each other.
    files = images.filter(F.col("content_sha256").isNotNull()).dropDuplicates(["path", "side"])
    return (
        files.groupBy("content_sha256")
        .agg(F.countDistinct("path").alias("n"), F.sort_array(F.collect_set("rel_path")).alias("paths"),
             F.sort_array(F.collect_set("label")).alias("labels"),
             F.sort_array(F.collect_set(F.coalesce("side", F.lit("none")))).alias("sides"),
             F.sort_array(F.collect_set(F.struct("rel_path", "label"))).alias("members"))
        .filter(F.col("n") > 1)
        .withColumn("crosses_split", F.array_contains("sides", "train") & F.array_contains("sides", "test"))
        .withColumn("crosses_label", F.size("labels") > 1)
    )


def duplicate_rows(sets: DataFrame) -> list[dict[str, Any]]:
    """The first ``EXAMPLES`` sets of ``duplicate_sets`` (largest first), as dicts for the report."""
    from pyspark.sql import functions as F

    return [{"content_sha256": r["content_sha256"], "n": r["n"], "paths": list(r["paths"])[:10],
             "labels": list(r["labels"]), "sides": list(r["sides"]),
             "members": [{"rel_path": m["rel_path"], "label": m["label"]} for m in r["members"][:10]]}
            for r in sets.orderBy(F.desc("n"), "content_sha256").limit(EXAMPLES).collect()]


def _exact(images: DataFrame, report: AuditReport) -> None:
    from pyspark.sql import functions as F

    sets = duplicate_sets(images).persist()
    totals = sets.agg(F.count("*").alias("sets"), F.sum("n").alias("images"),
                      F.sum(F.col("crosses_split").cast("int")).alias("split"),
                      F.sum(F.col("crosses_label").cast("int")).alias("label")).first()
    report.exact_duplicate_sets = int(totals["sets"] or 0)
    report.exact_duplicate_images = int(totals["images"] or 0)
    report.exact_cross_split_count = int(totals["split"] or 0)
    report.exact_cross_label_count = int(totals["label"] or 0)
    report.exact_cross_split = duplicate_rows(sets.filter("crosses_split"))
    report.exact_cross_label = duplicate_rows(sets.filter("crosses_label"))
    report.exact_examples = duplicate_rows(sets)
    sets.unpersist()


def label_conflicts(images: DataFrame) -> tuple[int, list[dict[str, Any]]]:
    """(how many contents carry more than one label, the first of them) among ``images`` (as ``duplicate_sets``)."""
    sets = duplicate_sets(images).filter("crosses_label").persist()
    found = (sets.count(), duplicate_rows(sets))
    sets.unpersist()
    return found


def _near(images: DataFrame, report: AuditReport, bits: int) -> None:
    from pyspark.sql import functions as F

    bands, chars = _bands(bits)
    hashed = images.filter(F.col("phash").isNotNull()).select(
        "path", "rel_path", "label", "side", "content_sha256", "phash",
        F.explode(F.array(*[F.struct(F.lit(b).alias("band"), F.substring("phash", 1 + b * chars, chars).alias("value"))
                            for b in range(bands)])).alias("_band"))
    a = hashed.select(*[F.col(c).alias(f"a_{c}") for c in ("path", "rel_path", "label", "side", "content_sha256", "phash")],
                      F.col("_band.band").alias("band"), F.col("_band.value").alias("value"))
    b = hashed.select(*[F.col(c).alias(f"b_{c}") for c in ("path", "rel_path", "label", "side", "content_sha256", "phash")],
                      F.col("_band.band").alias("band"), F.col("_band.value").alias("value"))
    pairs = (
        a.join(b, on=["band", "value"], how="inner")
        .filter((F.col("a_path") < F.col("b_path")) & (F.col("a_content_sha256") != F.col("b_content_sha256")))
        .drop("band", "value").dropDuplicates(["a_path", "b_path"])
        .withColumn("bits", _distance("a_phash", "b_phash"))
        .filter(F.col("bits") <= bits)
        .withColumn("crosses_split", (F.col("a_side") != F.col("b_side")) & F.col("a_side").isNotNull() & F.col("b_side").isNotNull())
        .withColumn("crosses_label", ~F.col("a_label").eqNullSafe(F.col("b_label")))
        .persist()
    )
    totals = pairs.agg(F.count("*").alias("n"), F.sum(F.col("crosses_split").cast("int")).alias("split"),
                       F.sum(F.col("crosses_label").cast("int")).alias("label")).first()
    report.near_duplicate_pairs = int(totals["n"] or 0)
    report.near_cross_split_count = int(totals["split"] or 0)
    report.near_cross_label_count = int(totals["label"] or 0)

    def rows(df: DataFrame) -> list[dict[str, Any]]:
        return [{"a": r["a_rel_path"], "b": r["b_rel_path"], "bits": r["bits"], "label_a": r["a_label"],
                 "label_b": r["b_label"], "side_a": r["a_side"], "side_b": r["b_side"],
                 "sha_a": r["a_content_sha256"], "sha_b": r["b_content_sha256"]}
                for r in df.orderBy("bits", "a_path", "b_path").limit(EXAMPLES).collect()]

    report.near_cross_split = rows(pairs.filter("crosses_split"))
    report.near_cross_label = rows(pairs.filter("crosses_label"))
    pairs.unpersist()


def _groups(images: DataFrame, report: AuditReport) -> None:
    from pyspark.sql import functions as F

    grouped = images.filter(F.col("group_id").isNotNull()).groupBy("group_id").agg(
        F.sum((F.col("side") == "train").cast("int")).alias("train"),
        F.sum((F.col("side") == "test").cast("int")).alias("test"),
        F.slice(F.sort_array(F.collect_list("rel_path")), 1, 5).alias("examples"),
    ).persist()
    report.groups = grouped.count()
    across = grouped.filter((F.col("train") > 0) & (F.col("test") > 0))
    report.groups_across_splits_count = across.count()
    report.groups_across_splits = [
        {"group_id": r["group_id"], "train": r["train"], "test": r["test"], "examples": list(r["examples"])}
        for r in across.orderBy(F.desc(F.col("train") + F.col("test")), "group_id").limit(EXAMPLES).collect()
    ]
    grouped.unpersist()


def check_leakage(report: AuditReport, allow_duplicates: bool, allow_group_overlap: bool) -> None:
    """Raise LeakageError naming files when exact duplicates or groups sit on both sides of the split."""
    problems = []
    if report.exact_cross_split_count and not allow_duplicates:
        examples = "; ".join(describe(i) for i in report.exact_cross_split[:3])
        problems.append(f"{report.exact_cross_split_count} exact duplicate contents are in both train and test "
                        f"(e.g. {examples}); --allow-duplicates to train anyway")
    if report.groups_across_splits_count and not allow_group_overlap:
        examples = "; ".join(describe(i) for i in report.groups_across_splits[:3])
        problems.append(f"{report.groups_across_splits_count} groups (patients) have images in both train and test "
                        f"(e.g. {examples}); --allow-group-overlap to train anyway")
    if problems:
        raise LeakageError("the train/test split leaks: " + " | ".join(problems) +
                           ". A grouped hash split avoids both: train.split_mode=hash (it keeps groups and exact "
                           "duplicates together), or extract with --set input.split.group=regex ...")


def check_label_conflicts(count: int, conflicts: list[dict[str, Any]], allow: bool, where: str) -> None:
    """Raise LabelConflictError naming the files (relative paths) and their labels when identical files carry
    different labels, unless ``allow``. The message is for the console only: it names files."""
    if not count or allow:
        return
    examples = "; ".join(" = ".join(f"{m['rel_path']} ({m['label']})" for m in item["members"]) for item in conflicts[:5])
    raise LabelConflictError(
        f"{count} file content(s) in {where} carry different labels, so one of each set is mislabelled (e.g. "
        f"{examples}). Fix or remove the wrong copies, or train anyway with --allow-label-conflicts "
        "(train.validity.allow_label_conflicts=true)")


def redact(report: AuditReport, key: Any) -> dict[str, Any]:
    """The report for an MLflow artifact: every file (by its content hash or its path) and group replaced by
    ``key(text)``, a keyed id, so that the artifact names no file and no patient."""
    data = report.to_dict()
    for item in data["exact_cross_split"] + data["exact_cross_label"] + data["exact_examples"]:
        content = key("sha256:" + item.pop("content_sha256"))
        item.pop("members", None)
        item["content_id"], item["paths"] = content, [content] * len(item["paths"])
    for item in data["near_cross_split"] + data["near_cross_label"]:
        item["a"], item["b"] = key("sha256:" + item.pop("sha_a")), key("sha256:" + item.pop("sha_b"))
    for item in data["groups_across_splits"]:
        item["group_id"] = key(item["group_id"])
        item["examples"] = [key(e) for e in item["examples"]]
    return data
