"""Delta writes, each one commit: an append, or a replace (old rows out, new rows in) as one ``replaceWhere`` overwrite.

A replace used to be a DELETE commit and then an append commit: between the two, readers saw the rows vanish,
and a job killed between them lost them. Now ``df`` is written with ``mode("overwrite")`` and
``replaceWhere = (model = M AND weights_id = W AND path IN (replaced paths)) OR run_id = R``: one commit removes every
row of the replaced paths (all slices of a volume: the predicate is on the path, not on the slice) and adds ``df``.
Every new row carries ``run_id = R`` (this run's id), so it satisfies the predicate as Delta requires, and no older
row has it. Appends are blind (Delta never makes a blind append conflict); the table's writer lease keeps a second
run of the same backbone away, so they cannot duplicate rows. Delta's optimistic concurrency may refuse a commit
when another run committed meanwhile: the commit is retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)

# Delta's concurrent-modification errors: another commit won; retrying on the new snapshot is safe.
RETRYABLE = ("ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
             "ConcurrentTransactionException", "MetadataChangedException", "ProtocolChangedException",
             "DELTA_CONCURRENT_")
ATTEMPTS = 5


def sql_string(value: str) -> str:
    """A Spark SQL string literal (backslash escapes, as Spark parses them by default)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def replace_predicate(replace: DataFrame, run_id: str) -> str:
    """The ``replaceWhere`` predicate for replacing the (path, model, weights_id) keys of ``replace`` by rows of run
    ``run_id``: the replaced keys' rows, or rows of this run (none yet)."""
    by_backbone: dict[tuple[str, str], list[str]] = {}
    for row in replace.select("path", "model", "weights_id").distinct().collect():
        by_backbone.setdefault((row["model"], row["weights_id"]), []).append(row["path"])
    terms = [
        f"(model = {sql_string(model)} AND weights_id = {sql_string(weights)} AND path IN "
        f"({', '.join(sql_string(p) for p in sorted(paths))}))"
        for (model, weights), paths in sorted(by_backbone.items())
    ]
    return " OR ".join([*terms, f"run_id = {sql_string(run_id)}"])


def with_retries(commit: Callable[[], None], location: str, pause_s: float = 1.0) -> None:
    """Run ``commit``; again (up to ATTEMPTS times, backing off) when Delta reports a concurrent commit."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            commit()
            return
        except Exception as exc:
            if attempt == ATTEMPTS or not any(name in str(exc) for name in RETRYABLE):
                raise
            log.warning("another run committed to %s meanwhile (%s); retrying (%d of %d)", location,
                        str(exc).splitlines()[0][:160], attempt + 1, ATTEMPTS)
            time.sleep(pause_s * 2 ** (attempt - 1))


def write(df: DataFrame, location: str, writer_for: Callable[[DataFrame, str], object], is_name: bool,
          replace: DataFrame | None = None, run_id: str | None = None) -> None:
    """Append ``df`` to the Delta table ``location``; with ``replace``, first remove those keys' rows, in the same
    commit. ``writer_for(df, mode)`` makes the DataFrameWriter (format, options)."""
    if replace is not None:
        if not run_id or "run_id" not in df.columns:
            raise ValueError("a Delta replace needs the run id, and the rows must carry it in a run_id column")
        options = {"replaceWhere": replace_predicate(replace, run_id), "mergeSchema": "true"}
        mode = "overwrite"
    else:
        options, mode = {"mergeSchema": "true"}, "append"  # a newer version may add columns

    def commit() -> None:
        writer = writer_for(df, mode).options(**options)  # type: ignore[attr-defined]
        writer.saveAsTable(location) if is_name else writer.save(location)

    with_retries(commit, location)
