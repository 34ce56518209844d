# Databricks notebook source
# MAGIC %md
# MAGIC # imgfeat: fine-tune a backbone
# MAGIC
# MAGIC Image folder -> a PyTorch backbone (EfficientNet-Lite0 by default) with a new linear head, trained with Spark's
# MAGIC `TorchDistributor` (DistributedDataParallel; NCCL on GPUs). Images are listed, labelled, split and decoded by
# MAGIC the same code as the extract notebook, once, into a Parquet table under `output`. Tracked in MLflow: curves,
# MAGIC the fine-tuned weights (state dicts), test metrics, and models for `imgfeat predict` and Model Serving.
# MAGIC
# MAGIC **Widgets** (same names as `imgfeat finetune` flags): `input`, `output` (shared storage: `/dbfs/...` or
# MAGIC `/Volumes/...`), `model`, `weights`, `split_mode`, `epochs`, `train_layers`, `num_processes`, `precision`,
# MAGIC `experiment`, `tracking_uri`, `config`, `set` (e.g. `finetune.use_gpu=true;finetune.local_mode=false`).
# MAGIC
# MAGIC docs/finetuning.md has what each setting does and the figures measured on the Kermany chest X-rays.

# COMMAND ----------

import os
import sys

try:
    import imgfeat  # noqa: F401  (the wheel attached to the cluster or job)
except ImportError:  # interactive, from the bundle's synced files: notebooks/../lib
    sys.path.insert(0, os.path.abspath(os.path.join(os.getcwd(), "..", "lib")))

from imgfeat.cli import notebook as nb
from imgfeat.finetune.run import run_finetune

nb.declare_widgets(dbutils, "finetune")

# COMMAND ----------

(cfg,) = nb.widget_configs(dbutils, "finetune")
print(f"input {cfg.input.path}; {cfg.model.name} ({cfg.model.weights}); {cfg.finetune.num_processes} processes, "
      f"train_layers {cfg.finetune.train_layers}; experiment {cfg.mlflow.experiment} at {nb.tracking_uri(cfg)}")

# COMMAND ----------

result = run_finetune(spark, cfg)
print(result.summary())
