"""Read tasks of even size: the packing imgfeat predicts is Spark's, and the settings it picks even the tasks out."""

from __future__ import annotations

import math
import random

from imgfeat.io.read_tasks import balanced_split_bytes, file_partitions, makespan


def _spark_task_sizes(spark, folder: str) -> list[int]:
    from pyspark.sql import functions as F

    rows = (spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(folder).select(F.spark_partition_id().alias("task"))
            .groupBy("task").count().collect())
    return [r["count"] for r in sorted(rows, key=lambda r: r["task"])]


def test_predicted_read_tasks_are_the_ones_spark_makes(spark, tmp_path):
    from imgfeat.session import sql_conf

    rng = random.Random(3)
    lengths = [rng.randint(1, 60_000) for _ in range(41)]
    for i, n in enumerate(lengths):
        (tmp_path / f"f{i:02d}.bin").write_bytes(b"x" * n)
    (tmp_path / "empty.bin").write_bytes(b"")  # Spark's scans skip it; so must the prediction
    settings = {"spark.sql.files.openCostInBytes": "8192", "spark.sql.files.maxPartitionBytes": "100000",
                "spark.sql.files.minPartitionNum": "1"}
    with sql_conf(spark, settings):
        actual = _spark_task_sizes(spark, str(tmp_path))
    predicted = file_partitions([*lengths, 0], 100_000, 8192)
    assert sorted(actual) == sorted(predicted) and len(actual) > 5


def test_a_split_with_a_short_last_task_is_evened_out():
    rng = random.Random(0)
    lengths = [rng.randint(3_000, 12_000) for _ in range(5216)]  # like the Kermany 224-px JPEGs
    open_cost, default = 1 << 20, 128 << 20
    before = file_partitions(lengths, default, open_cost)
    assert makespan(before, 2) > math.ceil(5216 / 2) + 40  # the last task short: one slot runs most of a task alone
    split = balanced_split_bytes(lengths, default, open_cost, slots=2, min_partitions=2)
    assert split is not None and split <= default
    after = file_partitions(lengths, split, open_cost)
    assert len(after) % 2 == 0
    assert makespan(after, 2) <= math.ceil(5216 / 2) + 16


def test_an_even_split_or_a_large_scan_is_left_to_spark():
    assert balanced_split_bytes([5_000] * 200, 128 << 20, 1 << 20, slots=2, min_partitions=2) is None  # 2 x 100
    assert balanced_split_bytes([5_000] * 50_000, 128 << 20, 1 << 20, slots=2, min_partitions=2) is None  # 393 tasks
    assert balanced_split_bytes([5_000] * 300, 128 << 20, 1 << 20, slots=1, min_partitions=1) is None


def test_extract_reads_in_tasks_that_finish_together(spark, tmp_path):
    """With read tasks capped at 9 files, 45 images split 9+9+9+9+9: one slot featurizes 27, the other 18. Under the
    settings imgfeat picks the busiest slot featurizes 24 (23 is the ideal; one split size packs every task but the
    last alike, and the cap rules out two tasks of 23 and 22)."""
    from PIL import Image

    from imgfeat.io.listing import list_files, read_task_settings
    from imgfeat.session import sql_conf

    from conftest import tiny_config

    folder = tmp_path / "in" / "a"
    folder.mkdir(parents=True)
    for i in range(45):
        Image.new("L", (16, 16), i).save(folder / f"{i:02d}.png")
    cfg = tiny_config(str(tmp_path / "in"), str(tmp_path / "out"))
    with sql_conf(spark, {"spark.sql.files.maxPartitionBytes": str(9 * (1 << 20) - 1)}):
        assert makespan(_spark_task_sizes(spark, str(tmp_path / "in")), 2) == 27
        images, _ = list_files(spark, cfg)
        settings = read_task_settings(spark, images, 45, 45, [])
        with sql_conf(spark, settings):
            sizes = _spark_task_sizes(spark, str(tmp_path / "in"))
    assert len(sizes) % 2 == 0 and sum(sizes) == 45
    assert makespan(sizes, 2) == 24
