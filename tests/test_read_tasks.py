"""Featurizing read tasks: the packing imgfeat predicts is Spark's, and the settings it picks give tasks of the asked
size in a multiple of the slots, finishing together."""

from __future__ import annotations

import math
import random

from imgfeat.io.read_tasks import file_partitions, makespan, planned_split_bytes, task_count


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


def _kermany_like(n: int = 5216) -> list[int]:
    rng = random.Random(0)
    return [rng.randint(3_000, 12_000) for _ in range(n)]  # like the Kermany 224-px JPEGs


def test_tasks_come_in_about_the_asked_size_and_a_multiple_of_the_slots():
    lengths, open_cost = _kermany_like(), 1 << 20
    before = file_partitions(lengths, 128 << 20, open_cost)  # Spark's own split in a local session
    assert len(before) == 41 and makespan(before, 2) > math.ceil(5216 / 2) + 40  # a short last task: one slot idles
    split = planned_split_bytes(lengths, open_cost, slots=2, per_task=512)
    after = file_partitions(lengths, split, open_cost)
    assert len(after) == 12 and min(after) >= 400 and max(after) <= 450  # 5,216 / 512 -> 11 -> 12 tasks
    assert makespan(after, 2) <= math.ceil(5216 / 2) + 8


def test_a_maxpartitionbytes_the_user_set_caps_the_tasks_which_are_then_evened_out():
    lengths, open_cost, cap = _kermany_like(), 1 << 20, 128 << 20
    split = planned_split_bytes(lengths, open_cost, slots=2, per_task=512, cap=cap)
    assert split <= cap
    after = file_partitions(lengths, split, open_cost)
    assert len(after) % 2 == 0 and len(after) >= 41 and max(after) <= 128
    assert makespan(after, 2) <= math.ceil(5216 / 2) + 16


def test_task_counts():
    assert task_count(5216, 2, 512) == 12  # 11 rounded up to the slots
    assert task_count(200, 2, 512) == 2  # never fewer tasks than slots: every slot busy
    assert task_count(3, 8, 512) == 3  # nor more tasks than files
    assert task_count(1000, 4, 512, at_least=9) == 12  # a cap's count, rounded up to the slots
    assert task_count(10, 1, 4) == 3
    assert planned_split_bytes([0, 0], 1 << 20, 2, 512) is None  # nothing to read


def test_extract_reads_in_tasks_that_finish_together(spark, tmp_path):
    """With read tasks capped at 9 files by the user, 45 images split 9+9+9+9+9: one slot featurizes 27, the other
    18. Under the settings imgfeat picks the busiest slot featurizes 24 (23 is the ideal; one split size packs every
    task but the last alike, and the cap rules out two tasks of 23 and 22). Without the cap, tasks of about
    ``inference.images_per_task`` images."""
    from PIL import Image

    from imgfeat.io.listing import list_files
    from imgfeat.io.reading import read_task_settings
    from imgfeat.session import sql_conf

    from conftest import tiny_config

    folder = tmp_path / "in" / "a"
    folder.mkdir(parents=True)
    for i in range(45):
        Image.new("L", (16, 16), i).save(folder / f"{i:02d}.png")
    cfg = tiny_config(str(tmp_path / "in"), str(tmp_path / "out"))
    with sql_conf(spark, {"spark.sql.files.maxPartitionBytes": str(9 * (1 << 20) - 1)}):
        assert makespan(_spark_task_sizes(spark, str(tmp_path / "in")), 2) == 27
        images, _ = list_files(spark, cfg.input)
        settings = read_task_settings(spark, cfg.inference, images, 45, 45, [])
        with sql_conf(spark, settings):
            sizes = _spark_task_sizes(spark, str(tmp_path / "in"))
    assert len(sizes) % 2 == 0 and sum(sizes) == 45
    assert makespan(sizes, 2) == 24
    cfg.inference.images_per_task = 4  # 45 / 4 -> 12 tasks
    with sql_conf(spark, read_task_settings(spark, cfg.inference, images, 45, 45, [])):
        sizes = _spark_task_sizes(spark, str(tmp_path / "in"))
    assert len(sizes) % 2 == 0 and 12 <= len(sizes) <= 16 and sum(sizes) == 45 and max(sizes) <= 4
    assert makespan(sizes, 2) <= 24


def test_tasks_are_sized_for_gpus_where_tasks_get_gpus():
    from imgfeat.config.schema import InferenceConfig
    from imgfeat.io.read_tasks import CPU_IMAGES_PER_TASK, GPU_IMAGES_PER_TASK, images_per_task

    class Session:
        def __init__(self, conf: dict[str, str]) -> None:
            self.conf = type("Conf", (), {"get": staticmethod(lambda key, default=None: conf.get(key, default))})()

    plain, gpus = Session({}), Session({"spark.task.resource.gpu.amount": "0.25"})
    assert images_per_task(plain, InferenceConfig()) == CPU_IMAGES_PER_TASK
    assert images_per_task(gpus, InferenceConfig()) == GPU_IMAGES_PER_TASK
    assert images_per_task(plain, InferenceConfig(device="gpu")) == GPU_IMAGES_PER_TASK
    assert images_per_task(gpus, InferenceConfig(device="cpu")) == CPU_IMAGES_PER_TASK
    assert images_per_task(gpus, InferenceConfig(images_per_task=100)) == 100


def test_the_other_files_lengths_take_one_job(spark, tmp_path):
    """A limit would scan one partition and then more in further jobs; the listing's other files are read in one."""
    from pyspark.sql import functions as F

    from imgfeat.io.listing import other_file_lengths
    from imgfeat.session import sql_conf

    for i in range(40):
        (tmp_path / f"note{i}.txt").write_bytes(b"x" * (i + 1))
    others = spark.read.format("binaryFile").load(str(tmp_path)).select(F.col("length").alias("file_length"))
    sc = spark.sparkContext
    sc.setJobGroup("other-lengths", "test")
    try:  # tiny read tasks: the scan has many partitions
        with sql_conf(spark, {"spark.sql.files.maxPartitionBytes": "64", "spark.sql.files.openCostInBytes": "1"}):
            assert others.rdd.getNumPartitions() > 4
            lengths = other_file_lengths(others)
    finally:
        sc.setJobGroup("", "")
    assert sorted(lengths) == list(range(1, 41))
    assert len(sc.statusTracker().getJobIdsForGroup("other-lengths")) == 1
