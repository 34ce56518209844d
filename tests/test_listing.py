"""Listing: which files are images (by extension, in any case), and that the filter stays off Spark's ICU path."""

from __future__ import annotations

import pytest

NAMES = ["A.JPG", "b.Png", "c.jpeg", "scan.NII.GZ", "vol.nii", "export0001", "notes.txt", "x.jpeg.bak", "gz.GZ"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("listing")
    for name in NAMES:
        (root / "NORMAL" / name).parent.mkdir(exist_ok=True)
        (root / "NORMAL" / name).write_bytes(b"not decoded while listing")
    return root


def _listed(spark, folder, *sets):
    from imgfeat.config import load_config
    from imgfeat.io.listing import list_files

    images, others = list_files(spark, load_config(overrides={"input.path": str(folder)}, sets=list(sets)).input)
    name = lambda rows: sorted(r["path"].rsplit("/", 1)[-1] for r in rows)  # noqa: E731
    return images, name(images.collect()), name(others.collect())


def test_extensions_match_in_any_case_and_extensionless_files_follow_the_setting(spark, folder):
    _, images, others = _listed(spark, folder)
    assert images == sorted(["A.JPG", "b.Png", "c.jpeg", "scan.NII.GZ", "vol.nii", "export0001"])
    assert others == sorted(["notes.txt", "x.jpeg.bak", "gz.GZ"])
    _, images, others = _listed(spark, folder, "input.extensionless=ignore", "input.extensions=[.PNG, nii.gz]")
    assert images == ["b.Png", "scan.NII.GZ"]
    assert "export0001" in others and len(images) + len(others) == len(NAMES)


def test_the_extension_filter_does_not_use_lower(spark, folder):
    """Spark 4's lower() maps case through ICU, whose first call in a JVM costs ~3.5 s of one core before the
    listing's first task can finish: the filter is a case-insensitive regular expression instead."""
    images, _, _ = _listed(spark, folder)
    plan = images._jdf.queryExecution().optimizedPlan().toString().lower()
    assert "rlike" in plan and "lower(" not in plan


def test_zero_byte_files_are_listed_from_the_file_index_without_python(spark, tmp_path):
    """Spark's scans skip zero-byte files, so the listing adds them from the file index: in the JVM, as a local
    relation (a list round-tripped through Python would start a Python daemon and copy every path)."""
    from imgfeat.io.listing import _input_files

    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "NORMAL" / "empty one.jpeg").write_bytes(b"")
    (tmp_path / "NORMAL" / "full+1.jpeg").write_bytes(b"bytes")
    images, names, _ = _listed(spark, tmp_path)
    assert names == ["empty one.jpeg", "full+1.jpeg"]
    assert {r["path"].rsplit("/", 1)[-1]: r["file_length"] for r in images.collect()} == {
        "empty one.jpeg": 0, "full+1.jpeg": 5}
    index = _input_files(spark, spark.read.format("binaryFile").load(str(tmp_path / "NORMAL")))
    plan = index._jdf.queryExecution().executedPlan().toString()
    assert "LocalTableScan" in plan and "ExistingRDD" not in plan and "Python" not in plan


def test_the_file_index_falls_back_to_python_with_a_warning_where_the_jvm_path_fails(spark, tmp_path, monkeypatch,
                                                                                     caplog):
    import imgfeat.io.listing as listing

    def no_scala(jvm, array):
        raise RuntimeError("no such Scala class")

    monkeypatch.setattr(listing, "_scala_seq", no_scala)
    (tmp_path / "a.jpeg").write_bytes(b"")
    with caplog.at_level("WARNING", logger="imgfeat.io.listing"):
        index = listing._input_files(spark, spark.read.format("binaryFile").load(str(tmp_path)))
        assert [r["path"].rsplit("/", 1)[-1] for r in index.collect()] == ["a.jpeg"]
    assert "copying its paths through Python instead" in caplog.text and "no such Scala class" in caplog.text


def test_listing_scans_take_one_task_per_core_not_spark_s_packing_by_bytes(spark, tmp_path):
    """Listing reads no contents, but Spark packs its scans as if it did (each file at least openCostInBytes): at a
    cluster's 4 MB open cost and 8 MB tasks, 40 files would be 20 listing tasks; under ``listing_settings``, one per
    core, with the same rows."""
    from imgfeat.config import load_config
    from imgfeat.io.labels import label_report
    from imgfeat.io.listing import listing_settings
    from imgfeat.session import sql_conf

    (tmp_path / "NORMAL").mkdir()
    for i in range(40):
        (tmp_path / "NORMAL" / f"{i:02d}.jpeg").write_bytes(b"x" * 100)
    cores = spark.sparkContext.defaultParallelism
    with sql_conf(spark, {"spark.sql.files.openCostInBytes": str(4 << 20),
                          "spark.sql.files.maxPartitionBytes": str(8 << 20)}):
        images, names, _ = _listed(spark, tmp_path)
        many = images.rdd.getNumPartitions()
        assert many >= 20
        settings = listing_settings(spark)
        assert int(settings["spark.sql.files.maxPartitionBytes"]) >= 100_000 * (4 << 20)
        with sql_conf(spark, settings):
            images, listed, _ = _listed(spark, tmp_path)
            assert images.rdd.getNumPartitions() <= many - 20 + cores  # the scan's 20 tasks -> one per core
            cfg = load_config(overrides={"input.path": str(tmp_path)})
            assert label_report(spark, cfg.input, images)["listed"] == 40
    assert listed == names and len(names) == 40


def test_listing_settings_are_left_to_spark_where_its_conf_is_out_of_reach():
    from imgfeat.io.listing import listing_settings

    class ConnectSession:  # Spark Connect: no JVM session behind the client
        pass

    assert listing_settings(ConnectSession()) == {}


def test_one_hash_gives_the_splits_their_old_buckets(spark):
    """extract's split, train's unit order and fine-tuning's validation share all go through ``hash_bucket``: the
    same values as the expressions each computed before."""
    from pyspark.sql import functions as F

    from imgfeat.io.splits import hash_bucket, split_unit

    rows = spark.createDataFrame([(f"{i:024x}", None if i % 3 else f"p{i % 7}") for i in range(200)],
                                 "image_id string, group_id string")
    unit = F.coalesce(F.concat(F.lit("group:"), F.col("group_id")), F.col("image_id"))
    old = F.pmod(F.xxhash64(F.lit(43), unit), F.lit(1_000_000)) / F.lit(1_000_000.0)
    got = rows.select(hash_bucket(43, split_unit()).alias("new"), old.alias("old"),
                      hash_bucket(42, F.col("image_id"), buckets=None).alias("raw"),
                      F.xxhash64(F.lit(42), F.col("image_id")).alias("raw_old")).collect()
    assert all(r["new"] == r["old"] and r["raw"] == r["raw_old"] for r in got)
    assert len({r["new"] for r in got}) > 100 and all(0 <= r["new"] < 1 for r in got)
