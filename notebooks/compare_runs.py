# Databricks notebook source
# MAGIC %md
# MAGIC # imgfeat: compare runs
# MAGIC
# MAGIC The MLflow experiment's backbone x head runs as one table, best first: accuracy, precision / recall / F1 of
# MAGIC the positive class, macro F1, kappa, AUC. Each row links to its MLflow run (metrics, confusion matrix, ROC
# MAGIC curve, the logged model). The table is also logged (Markdown, CSV, bar chart) to the parent run.
# MAGIC
# MAGIC **Widgets**: `experiment` (e.g. `/Users/you@example.com/imgfeat`), `positive_class` (e.g. `PNEUMONIA` or
# MAGIC `COVID`), `tracking_uri` (`databricks`), `config`, `set`.

# COMMAND ----------

import os
import sys

try:
    import imgfeat  # noqa: F401  (the wheel attached to the cluster or job)
except ImportError:  # interactive, from the bundle's synced files: notebooks/../lib
    sys.path.insert(0, os.path.abspath(os.path.join(os.getcwd(), "..", "lib")))

from imgfeat.cli import notebook as nb
from imgfeat.train.compare import run_compare

nb.declare_widgets(dbutils, "compare")

# COMMAND ----------

(cfg,) = nb.widget_configs(dbutils, "compare")
table = run_compare(cfg)
display(table)

# COMMAND ----------

# MAGIC %md Each row's MLflow run (opens the workspace's MLflow UI on Databricks, `mlflow ui` locally):

# COMMAND ----------

linked = nb.with_run_links(table, cfg, host=nb.workspace_url(spark))
displayHTML(nb.links_html(linked))
