"""The input folder: its fully qualified root, and the error for an input that is missing or unusable."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


class InputError(ValueError):
    """The input folder or manifest is missing or unusable."""


def qualify(spark: SparkSession, path: str) -> str:
    """The fully qualified form Spark uses in its ``path`` column (e.g. file:/abs/dir)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", path) and not re.match(r"^[a-zA-Z]:\\", path):
        qualified = path
    else:
        qualified = "file:" + os.path.abspath(path)
    try:
        jvm = spark.sparkContext._jvm  # type: ignore[union-attr]
        jpath = jvm.org.apache.hadoop.fs.Path(qualified)
        fs = jpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())  # type: ignore[union-attr]
        if not fs.exists(jpath):
            raise InputError(f"input folder {path!r} does not exist (looked for {qualified})")
        qualified = fs.makeQualified(jpath).toString()
    except InputError:
        raise
    except Exception:  # Spark Connect / no JVM access: trust the string
        pass
    return qualified.rstrip("/")


def input_root(spark: SparkSession, path: str | None) -> str:
    """``input.path``, qualified (an InputError when it is not set or does not exist)."""
    if not path:
        raise InputError("no input folder: pass --input DIR (or set input.path)")
    return qualify(spark, path)
