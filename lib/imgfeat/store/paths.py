"""Table locations: names versus paths, the folders a run keeps beside a table, and which file systems rename.

Beside a path table ``<base>`` (never inside it) a run keeps, named with its run id so that its owner is known:

- ``<base>.imgfeat-staging-<run_id>-<tag>``: rows written before they are moved (or swapped) into the table;
- ``<base>.imgfeat-scratch-<run_id>-<tag>``: a frozen plan (``tables.materialize``);
- ``<base>.imgfeat-old-<run_id>-<tag>``: the previous table during a swap;
- ``<base>.imgfeat-leases/``: the writers' leases and the commit lock (``store.lease``).

They are found by listing the parent folder and comparing names, never by a glob, so a location whose name holds
``[ ] { } * ?`` means itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# Stores where a folder rename is a copy and a delete (not atomic). /Volumes/... on Databricks resolves to dbfs.
OBJECT_STORE_SCHEMES = frozenset({"s3", "s3a", "s3n", "gs", "abfs", "abfss", "wasb", "wasbs", "adl", "dbfs", "oss",
                                  "cosn", "obs"})
RUN_FOLDER_KINDS = ("staging", "scratch", "old")
LEASES_SUFFIX = ".imgfeat-leases"
_RUN_FOLDER = re.compile(r"(staging|scratch|old)-([^-]+)(?:-.*)?")


def is_table_name(location: str) -> bool:
    """``catalog.schema.table`` or ``schema.table`` (no slash, no scheme)."""
    return bool(re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_`][\w`]*){1,2}", location))


def location_in(root: str, name: str) -> str:
    """A table ``name`` under an output root: ``catalog.schema`` -> ``catalog.schema.name``; a folder -> ``folder/name``.

    A root with one dot and no slash or scheme is read as a Unity Catalog (or metastore) ``catalog.schema``;
    write ``./out.v2`` for a local folder with a dot in its name.
    """
    root = root.strip()
    if not root:
        raise ValueError("empty output root: give a folder (dbfs:/..., /Volumes/..., s3://...) or catalog.schema")
    if is_table_name(root):
        if root.count(".") != 1:
            raise ValueError(f"output root {root!r} looks like a table name; give catalog.schema (one dot) or a folder")
        return f"{root}.{name}"
    return f"{root.rstrip('/')}/{name}"


def hadoop_fs(spark: SparkSession, location: str) -> tuple[Any, Any]:
    """(Hadoop FileSystem, Path) of ``location``."""
    jvm = spark.sparkContext._jvm  # type: ignore[union-attr]
    jpath = jvm.org.apache.hadoop.fs.Path(location)
    return jpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), jpath  # type: ignore[union-attr]


def escape_glob(location: str) -> str:
    """``location`` for Spark's readers, which expand Hadoop globs: ``out[1]`` would otherwise mean ``out1``."""
    return re.sub(r"([\\\[\]{}*?])", r"\\\1", location)


def scheme_of(spark: SparkSession | None, location: str) -> str:
    """The file system scheme of a path: its own, else the default file system's (``file`` without Spark)."""
    match = re.match(r"([A-Za-z][\w+.-]*):", location)
    if match and len(match.group(1)) > 1:  # not a Windows drive letter
        return match.group(1).lower()
    if spark is None:
        return "file"
    return str(hadoop_fs(spark, location)[0].getScheme()).lower()


def is_object_store(spark: SparkSession | None, location: str) -> bool:
    return scheme_of(spark, location) in OBJECT_STORE_SCHEMES


def run_folder(location: str, kind: str, run_id: str, tag: str) -> str:
    """The folder beside ``location`` that run ``run_id`` keeps for ``kind`` (one of RUN_FOLDER_KINDS)."""
    if kind not in RUN_FOLDER_KINDS or "-" in run_id or not run_id:
        raise ValueError(f"bad run folder {kind!r} / run id {run_id!r}")
    return f"{location.rstrip('/')}.imgfeat-{kind}-{run_id}-{tag}"


@dataclass(frozen=True)
class RunFolder:
    kind: str  # staging | scratch | old
    owner: str  # the run id in its name (legacy names: whatever follows the kind)
    path: Any  # Hadoop Path
    mtime: int  # ms


def run_folders(spark: SparkSession, location: str) -> list[RunFolder]:
    """The run folders beside ``location`` (by name, listing its parent: no glob)."""
    fs, target = hadoop_fs(spark, location.rstrip("/"))
    parent = target.getParent()
    if parent is None or not fs.exists(parent):
        return []
    prefix = target.getName() + ".imgfeat-"
    found = []
    for status in fs.listStatus(parent):
        name = status.getPath().getName()
        match = _RUN_FOLDER.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        if match:
            found.append(RunFolder(match.group(1), match.group(2), status.getPath(), status.getModificationTime()))
    return found


def scratch_table(location: str, run_id: str, tag: str) -> str:
    """The scratch table of run ``run_id`` for a table name: same catalog and schema, named after the table."""
    *schema, table = location.split(".")
    return ".".join([*schema, f"{table.strip('`')}__imgfeat_scratch_{run_id}_{tag}"])


def scratch_table_owner(location: str, name: str) -> str | None:
    """The run id of a scratch table ``name`` (unqualified) of ``location``, None when it is not one."""
    prefix = location.split(".")[-1].strip("`") + "__imgfeat_scratch_"
    if not name.lower().startswith(prefix.lower()):
        return None
    return name[len(prefix):].split("_", 1)[0] or None


def lease_folder(spark: SparkSession, location: str, lease_dir: str | None = None) -> str:
    """Where the leases of ``location`` live: beside a path; for a table name under ``lease_dir`` (default: the
    session's ``spark.sql.warehouse.dir``)."""
    if not is_table_name(location):
        return location.rstrip("/") + LEASES_SUFFIX
    root = lease_dir or spark.conf.get("spark.sql.warehouse.dir", None)
    if not root:
        raise ValueError(f"{location} is a table name: set output.lease_dir to a folder for its writers' leases")
    return f"{root.rstrip('/')}/{location.replace('`', '')}{LEASES_SUFFIX}"
