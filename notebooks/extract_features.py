# Databricks notebook source
# MAGIC %md
# MAGIC # imgfeat: extract features
# MAGIC
# MAGIC Folder of images (one sub-folder per class) -> a features table (one row per image and backbone) and an
# MAGIC errors table (every file that could not be featurized, with the reason). Incremental: run it again and only
# MAGIC new or changed files are featurized.
# MAGIC
# MAGIC **Widgets** (a job's parameters fill them): `input` image folder (`/Volumes/...`, `dbfs:/...`, `s3://...`);
# MAGIC `output_root` a folder or a Unity Catalog `catalog.schema` (tables `<root>/features` or
# MAGIC `catalog.schema.features`, errors beside them with `_errors`); `model` backbones, comma-separated; `weights`;
# MAGIC `format` (`auto` = Delta on Databricks); `batch_size`; `config` settings files; `set` `key=value` overrides.
# MAGIC
# MAGIC **Cluster**: a GPU ML runtime (e.g. `15.4.x-gpu-ml-scala2.12`) with `spark.task.resource.gpu.amount 1`, so each
# MAGIC task owns a GPU; `conf/databricks.yaml` sets `inference.batch_size: 128`. On a CPU cluster lower `batch_size`.
# MAGIC The `imgfeat` wheel is attached by the bundle's job; interactively, `%pip install` it (see `docs/databricks.md`)
# MAGIC or run this notebook from the bundle's synced files (`../lib` is used when the wheel is not installed).

# COMMAND ----------

import os
import sys

try:
    import imgfeat  # noqa: F401  (the wheel attached to the cluster or job)
except ImportError:  # interactive, from the bundle's synced files: notebooks/../lib
    sys.path.insert(0, os.path.abspath(os.path.join(os.getcwd(), "..", "lib")))

from imgfeat.cli import notebook as nb
from imgfeat.featurize.extract import run_extract

nb.declare_widgets(dbutils, "extract")

# COMMAND ----------

configs = nb.widget_configs(dbutils, "extract")
for cfg in configs:
    print(f"{cfg.model.name}: {cfg.input.path} -> {cfg.output.path} (errors {cfg.errors_path}), "
          f"format {cfg.output.format}, batch size {cfg.inference.batch_size}")

# COMMAND ----------

results = []
for cfg in configs:
    result = run_extract(spark, cfg)
    print(result.summary())
    results.append(result)

# COMMAND ----------

# MAGIC %md Counts per backbone: every listed file is either featurized or failed (see the errors table).

# COMMAND ----------

display(nb.results_frame(results))
