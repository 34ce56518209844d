# Databricks notebook source
# MAGIC %md
# MAGIC # imgfeat: train heads
# MAGIC
# MAGIC Features table -> logistic regression, random forest and decision tree heads (Spark MLlib) for every backbone
# MAGIC in the table, on one deterministic, stratified train/test split. Tracked in MLflow: one parent run per call,
# MAGIC one child run per backbone x head with metrics, plots and the model (featurizer + head, scores raw images).
# MAGIC
# MAGIC **Widgets**: `output_root` (same as the extract notebook; the features table is `<root>/features` or
# MAGIC `catalog.schema.features`) or `features` explicitly; `heads`; `experiment` (on Databricks a workspace path
# MAGIC such as `/Users/you@example.com/imgfeat`); `tracking_uri` (`databricks`); `test_fraction`; `cv_folds`;
# MAGIC `register` (Model Registry name for the best model); `config`; `set`.
# MAGIC
# MAGIC A CPU cluster is enough.

# COMMAND ----------

import os
import sys

try:
    import imgfeat  # noqa: F401  (the wheel attached to the cluster or job)
except ImportError:  # interactive, from the bundle's synced files: notebooks/../lib
    sys.path.insert(0, os.path.abspath(os.path.join(os.getcwd(), "..", "lib")))

from imgfeat.cli import notebook as nb
from imgfeat.train.fit import run_train

nb.declare_widgets(dbutils, "train")

# COMMAND ----------

(cfg,) = nb.widget_configs(dbutils, "train")
print(f"features {cfg.train.features}; heads {', '.join(cfg.train.heads)}; "
      f"experiment {cfg.mlflow.experiment} at {nb.tracking_uri(cfg)}")

# COMMAND ----------

result = run_train(spark, cfg)
print(f"parent run: {result.parent_run_id}")

# COMMAND ----------

display(nb.results_frame([result]))
