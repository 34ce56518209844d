"""``imgfeat bench``: our extract job vs a plain Keras or PyTorch script (the backbone's engine) on the same images.

Both sides run as their own processes (whole process timed, start-up included), one after the other,
on the same N files. Peak memory is sampled from each process tree (driver JVM, Python driver, Python
workers). A benchmark, not a test: it prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass
class MemoryPeaks:
    jvm_mb: float = 0.0  # Spark driver JVM
    python_driver_mb: float = 0.0  # the top-level Python process
    python_workers_mb: float = 0.0  # sum over Python workers at the worst moment
    python_worker_max_mb: float = 0.0  # the largest single Python worker
    total_mb: float = 0.0  # the whole process tree at the worst moment


class _MemorySampler(threading.Thread):
    """Samples the RSS of a process tree every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peaks = pid, interval, MemoryPeaks()
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        mb = 1024 * 1024
        while not self._stop_event.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = {}
                for p in procs:
                    try:
                        rss[p.pid] = (p.name(), p.memory_info().rss / mb)
                    except psutil.NoSuchProcess:
                        continue
            except psutil.NoSuchProcess:
                break
            peaks = self.peaks
            workers = [v for pid, (n, v) in rss.items() if pid != self.pid and "python" in n]
            jvm = [v for n, v in rss.values() if "java" in n]
            peaks.python_driver_mb = max(peaks.python_driver_mb, rss.get(self.pid, ("", 0.0))[1])
            peaks.jvm_mb = max(peaks.jvm_mb, sum(jvm))
            peaks.python_workers_mb = max(peaks.python_workers_mb, sum(workers))
            peaks.python_worker_max_mb = max(peaks.python_worker_max_mb, max(workers, default=0.0))
            peaks.total_mb = max(peaks.total_mb, sum(v for _, v in rss.values()))
            self._stop_event.wait(self.interval)

    def stop(self) -> MemoryPeaks:
        self._stop_event.set()
        self.join(timeout=5)
        return self.peaks


def _timed(cmd: list[str], env: dict[str, str], log_path: str) -> tuple[float, MemoryPeaks, int]:
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = _MemorySampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        peaks = sampler.stop()
    return time.perf_counter() - started, peaks, rc


def list_images(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        found += [
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith((".", "_"))
        ]
    return found


def prepare_inputs(input_dir: str, limit: int, workdir: str) -> tuple[str, list[str]]:
    """A folder of ``limit`` symlinks to the input images (the list repeated when it is shorter)."""
    source = list_images(input_dir)
    if not source:
        raise ValueError(f"no images under {input_dir}")
    folder = os.path.join(workdir, "images")
    files = []
    for i in range(limit):
        src = os.path.abspath(source[i % len(source)])
        cls = os.path.basename(os.path.dirname(src))
        os.makedirs(os.path.join(folder, cls), exist_ok=True)
        dst = os.path.join(folder, cls, f"{i:07d}_{os.path.basename(src)}")
        os.symlink(src, dst)
        files.append(dst)
    return folder, files


# The plain single-process script each engine is compared with: (module, what it is).
BASELINES = {
    "keras": ("imgfeat.bench.baseline", "plain Keras + tf.data"),
    "torch": ("imgfeat.bench.baseline_torch", "plain PyTorch + DataLoader"),
}


@dataclass
class BenchResult:
    model: str
    engine: str
    images: int
    input_dir: str
    master: str
    ours_seconds: float
    baseline_seconds: float
    ours_images_per_s: float
    baseline_images_per_s: float
    ratio: float  # ours / baseline throughput
    ours_memory: MemoryPeaks
    baseline_memory: MemoryPeaks
    stages: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        rows = [
            (f"imgfeat extract (Spark {self.master})", self.ours_seconds, self.ours_images_per_s, self.ours_memory),
            (BASELINES[self.engine][1], self.baseline_seconds, self.baseline_images_per_s, self.baseline_memory),
        ]
        lines = [
            f"model={self.model} engine={self.engine} images={self.images} input={self.input_dir}",
            f"{'pipeline':<34} {'seconds':>8} {'img/s':>7} {'peak MB (total / jvm / py workers)':>36}",
        ]
        for name, sec, ips, mem in rows:
            lines.append(
                f"{name:<34} {sec:>8.1f} {ips:>7.2f} {mem.total_mb:>14.0f} / {mem.jvm_mb:>5.0f} / {mem.python_workers_mb:>6.0f}"
            )
        lines.append(f"ratio ours/baseline: {self.ratio:.2f}")
        if self.stages:
            lines.append("our stages: " + ", ".join(f"{k}={v:.1f}s" for k, v in self.stages.items()))
        return "\n".join(lines)


def run_bench(
    input_dir: str,
    model: str = "resnet50",
    limit: int = 2000,
    master: str = "local[*]",
    batch_size: int = 32,
    sets: list[str] | None = None,
    workdir: str | None = None,
    skip_baseline: bool = False,
    configs: list[str] | None = None,
) -> BenchResult:
    """Run both pipelines on the same ``limit`` images and return the comparison."""
    from imgfeat.backbones.registry import get_backbone

    engine = get_backbone(model).engine
    workdir = workdir or tempfile.mkdtemp(prefix="imgfeat-bench-")
    folder, files = prepare_inputs(input_dir, limit, workdir)
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2"}
    ours_json = os.path.join(workdir, "ours.json")
    ours_cmd = [
        sys.executable, "-m", "imgfeat.cli", "extract", "--input", folder,
        "--output", os.path.join(workdir, "features"), "--model", model, "--weights", "none",
        "--format", "parquet", "--batch-size", str(batch_size), "--master", master,
        "--json", ours_json, "--set", "spark.conf={spark.ui.enabled: 'false'}",
    ]
    for path in configs or []:
        ours_cmd += ["--config", os.path.abspath(path)]
    for item in sets or []:
        ours_cmd += ["--set", item]
    ours_s, ours_mem, rc = _timed(ours_cmd, env, os.path.join(workdir, "ours.log"))
    if rc != 0:
        raise RuntimeError(f"our extract failed (rc={rc}); see {workdir}/ours.log")
    with open(ours_json, encoding="utf-8") as fh:
        ours = json.load(fh)
    if ours["featurized"] != limit:
        raise RuntimeError(f"expected {limit} featurized images, got {ours['featurized']} (failed {ours['failed']})")
    base_s, base_mem = float("nan"), MemoryPeaks()
    if not skip_baseline:
        list_path = os.path.join(workdir, "files.txt")
        with open(list_path, "w", encoding="utf-8") as fh:
            fh.write("\n".join(files))
        base_cmd = [
            sys.executable, "-m", BASELINES[engine][0], "--list", list_path, "--model", model,
            "--batch-size", str(batch_size), "--out", os.path.join(workdir, "baseline.npy"),
        ]
        base_s, base_mem, rc = _timed(base_cmd, env, os.path.join(workdir, "baseline.log"))
        if rc != 0:
            raise RuntimeError(f"baseline failed (rc={rc}); see {workdir}/baseline.log")
    ours_ips, base_ips = limit / ours_s, limit / base_s
    return BenchResult(
        model=model, engine=engine, images=limit, input_dir=input_dir, master=master,
        ours_seconds=round(ours_s, 2), baseline_seconds=round(base_s, 2),
        ours_images_per_s=round(ours_ips, 3), baseline_images_per_s=round(base_ips, 3),
        ratio=round(ours_ips / base_ips, 3), ours_memory=ours_mem, baseline_memory=base_mem,
        stages=ours.get("stage_seconds", {}), settings={"batch_size": batch_size, "configs": configs or [], "sets": sets or [],
                  "ours_command": ours_cmd[1:]},
    )


def to_json(result: BenchResult) -> dict[str, Any]:
    return asdict(result)
