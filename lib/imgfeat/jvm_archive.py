"""A class-data archive (Java AppCDS) for the local JVM that imgfeat starts: Spark's classes mapped from one file
instead of loaded, verified and linked from its jars at every start.

A local session and its first job start in about half the time (docs/benchmarks.md). ``make setup`` builds it
(``python -m imgfeat.jvm_archive``, once: a JVM that runs a small Spark workload and writes the classes it loaded
at exit, then a second JVM that must start from the archive before it is put in place). Sessions then use it
when it is there and whole; nothing is built at run time.

A dynamic archive is only valid for the JVM and class path it was made with. The file name carries a key of the Java
binary and of pyspark's version, jars and their folder, so another Java, pyspark or environment looks for its own
archive (and a JVM that still finds a mismatch ignores the archive, silently, at normal speed). A truncated archive would crash the JVM
(SIGBUS when it maps the missing part), so an archive is written under a temporary name, validated, recorded with
its size beside it, and used only while its size matches. ``IMGFEAT_JVM_ARCHIVE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DISABLE_ENV = "IMGFEAT_JVM_ARCHIVE"
LOGS_OFF = "-Xlog:cds=off -Xlog:cds+dynamic=off"  # CDS warns about every class it cannot archive

# The workload whose classes the archive holds: what a local extract's JVM loads (session, binaryFile listing,
# aggregation, a pandas UDF over Arrow, a Parquet write and read).
_WORKLOAD = r"""
import os, sys
import pandas as pd
from pyspark.sql import SparkSession, functions as F
work = sys.argv[1]
options = sys.argv[2]
spark = (SparkSession.builder.master("local[2]").appName("imgfeat-jvm-archive").config("spark.ui.enabled", "false")
         .config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.host", "127.0.0.1")
         .config("spark.sql.execution.arrow.pyspark.enabled", "true")
         .config("spark.driver.extraJavaOptions", options).getOrCreate())
for i in range(4):
    with open(os.path.join(work, f"f{i}.bin"), "wb") as fh:
        fh.write(bytes([i]) * (100 + i))
files = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(work)
def lengths(batches):
    for b in batches:
        yield pd.DataFrame({"path": b["path"], "n": b["content"].map(len)})
rows = files.mapInPandas(lengths, "path string, n long").groupBy((F.col("n") % 2).alias("odd")).count()
rows.write.mode("overwrite").parquet(os.path.join(work, "out"))
assert spark.read.parquet(os.path.join(work, "out")).count() == 2
import psutil
print("JVM_PID", *[c.pid for c in psutil.Process().children(recursive=True) if c.name() == "java"], flush=True)
"""


def _cache_dir() -> Path:
    base = os.environ.get("IMGFEAT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "imgfeat")
    return Path(base) / "jvm"


def _java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    return os.path.realpath(java) if java and os.path.exists(java) else None


def archive_path() -> Path | None:
    """Where this Java and pyspark's archive lives (whether or not it exists); None without Java or pyspark."""
    java = _java()
    try:
        import pyspark
    except ImportError:
        return None
    if java is None:
        return None
    jars = Path(pyspark.__file__).parent / "jars"
    key = hashlib.sha256()
    stat = os.stat(java)
    # The jars' folder too: the archive records the class path, so each environment (venv) needs its own.
    key.update(f"{java}|{stat.st_size}|{stat.st_mtime_ns}|{pyspark.__version__}|{jars.resolve()}".encode())
    for jar in sorted(jars.glob("*.jar")) if jars.is_dir() else []:
        key.update(f"|{jar.name}:{jar.stat().st_size}".encode())
    return _cache_dir() / f"spark-{pyspark.__version__}-{key.hexdigest()[:16]}.jsa"


def _recorded_size(archive: Path) -> int | None:
    try:
        return int(json.loads(archive.with_suffix(".json").read_text())["size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def java_options() -> str:
    """JVM options that start from the archive, or "" when there is none, it is incomplete, or it is turned off."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return ""
    archive = archive_path()
    if archive is None or not archive.is_file():
        return ""
    size = _recorded_size(archive)
    if size is None or size != archive.stat().st_size:
        return ""
    return f"-XX:SharedArchiveFile={archive} -Xshare:auto {LOGS_OFF}"


def _run_workload(options: str, timeout: float) -> tuple[int, int | None, str]:
    with tempfile.TemporaryDirectory(prefix="imgfeat-jvm-archive-") as work:
        proc = subprocess.run([sys.executable, "-c", _WORKLOAD, work, options], capture_output=True, text=True,
                              timeout=timeout, env={"PYSPARK_PYTHON": sys.executable, **os.environ,
                                                                    "SPARK_LOCAL_IP": "127.0.0.1"})
    pid = next((int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("JVM_PID ")), None)
    return proc.returncode, pid, proc.stderr[-2000:]


def _wait_gone(pid: int | None, timeout: float) -> bool:
    """Wait for the JVM, which writes the archive as it exits after its Python driver."""
    import psutil

    if pid is None:
        return True
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


def build(force: bool = False, timeout: float = 300.0) -> Path | None:
    """Build, validate and install the archive (None where Java, pyspark or AppCDS is missing: sessions then start
    without it). Idempotent: an archive already in place is kept unless ``force``."""
    archive = archive_path()
    if archive is None:
        print("[imgfeat] jvm archive: no Java or pyspark here; skipped")
        return None
    if not force and java_options():
        print(f"[imgfeat] jvm archive: {archive} (in place)")
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f"{archive.stem}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    base = "-XX:TieredStopAtLevel=1"
    rc, pid, err = _run_workload(f"{base} -XX:ArchiveClassesAtExit={tmp} {LOGS_OFF}", timeout)
    if rc != 0 or not _wait_gone(pid, timeout) or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        print(f"[imgfeat] jvm archive: not built (rc={rc}): {err.strip().splitlines()[-1:] or ''}; sessions start "
              "without it")
        return None
    # -Xshare:on: a JVM that cannot map the archive refuses to start, so only a usable archive is installed.
    rc, pid, err = _run_workload(f"{base} -XX:SharedArchiveFile={tmp} -Xshare:on {LOGS_OFF}",
                                 timeout)
    _wait_gone(pid, 30)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        print(f"[imgfeat] jvm archive: built but not usable (rc={rc}); sessions start without it")
        return None
    size = tmp.stat().st_size
    os.replace(tmp, archive)
    archive.with_suffix(".json").write_text(json.dumps({"size": size, "java": _java()}))
    print(f"[imgfeat] jvm archive: {archive} ({size / 2**20:.0f} MiB); local sessions start from it")
    return archive


if __name__ == "__main__":
    try:
        build(force="--force" in sys.argv)
    except (OSError, subprocess.SubprocessError) as exc:  # an unwritable cache, a JVM that hangs: start without it
        print(f"[imgfeat] jvm archive: not built ({type(exc).__name__}: {exc}); sessions start without it")
