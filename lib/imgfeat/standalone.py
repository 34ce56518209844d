"""A Spark standalone cluster on 127.0.0.1 (master + workers from the pyspark installation), for tests and benchmarks.

Imports pyspark (to find its installation): import this module only where a cluster is started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import pyspark

SPARK_HOME = os.path.dirname(os.path.abspath(pyspark.__file__))
SPARK_CLASS = os.path.join(SPARK_HOME, "bin", "spark-class")
SPARK_SUBMIT = os.path.join(SPARK_HOME, "bin", "spark-submit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, what: str, limit: float = 180.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"standalone cluster: gave up waiting for {what}")
        time.sleep(0.5)


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop a process started with start_new_session=True and everything it started (executors, Python workers)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group even when the leader is gone
    except ProcessLookupError:
        pass
    proc.wait(timeout=grace)


@dataclass
class Standalone:
    root: str
    env: dict[str, str]
    master_port: int = field(default_factory=free_port)
    ui_port: int = field(default_factory=free_port)
    master: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(os.path.join(self.env["SPARK_LOG_DIR"], f"{name}.log"), "wb") as log:  # the child keeps its copy
            return subprocess.Popen([SPARK_CLASS, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def alive_workers(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=5) as r:
                return int(json.load(r).get("aliveworkers", 0))
        except OSError:
            return -1

    def start(self, n_workers: int = 2, memory: str = "1g") -> Standalone:
        self.master = self._spawn("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                             "--port", str(self.master_port), "--webui-port", str(self.ui_port)])
        _wait(lambda: self.alive_workers() >= 0, "the master")
        for i in range(n_workers):
            work_dir = os.path.join(self.env["SPARK_WORKER_DIR"], f"w{i}")
            self.workers.append(self._spawn(f"worker{i}", [
                "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--port", str(free_port()),
                "--webui-port", str(free_port()), "--cores", "1", "--memory", memory, "--work-dir", work_dir, self.url,
            ]))
        _wait(lambda: self.alive_workers() == n_workers, f"{n_workers} workers")
        return self

    def submit_command(self, lib_dir: str, executors: int, executor_memory: str = "1g", driver_memory: str = "1g",
                       conf: dict[str, str] | None = None) -> list[str]:
        """``spark-submit --master <this cluster>`` with this Python on driver and executors, ``lib_dir`` on
        the executors' path, ``executors`` one-core executors, the driver on 127.0.0.1 and no web UI;
        ``conf`` adds or overrides settings. Append the script and its arguments."""
        settings = {
            "spark.pyspark.python": sys.executable,
            "spark.pyspark.driver.python": sys.executable,
            "spark.executorEnv.PYTHONPATH": lib_dir,
            "spark.executorEnv.TF_CPP_MIN_LOG_LEVEL": "2",
            "spark.executor.memory": executor_memory,
            "spark.executor.cores": "1",
            "spark.cores.max": str(executors),
            "spark.driver.memory": driver_memory,
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.ui.enabled": "false",
            **(conf or {}),
        }
        cmd = [SPARK_SUBMIT, "--master", self.url]
        for key, value in settings.items():
            cmd += ["--conf", f"{key}={value}"]
        return cmd

    def kill_worker(self, i: int) -> None:
        """Lose worker ``i`` like a machine: the worker, its executor and its Python workers die at once."""
        os.killpg(self.workers[i].pid, signal.SIGKILL)
        self.workers[i].wait(timeout=30)

    def stop(self) -> None:
        for proc in [*self.workers, self.master]:
            if proc is not None:
                stop_group(proc)

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.env["SPARK_LOG_DIR"])):
            with open(os.path.join(self.env["SPARK_LOG_DIR"], name), errors="replace") as fh:
                out.append(f"--- {name}\n{fh.read()[-2000:]}")
        return "\n".join(out)


def standalone_env(root: str) -> dict[str, str]:
    dirs = {k: os.path.join(root, k.lower()) for k in ("SPARK_WORKER_DIR", "SPARK_LOG_DIR", "SPARK_PID_DIR")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    return {
        **os.environ, **dirs,
        "SPARK_HOME": SPARK_HOME, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_MASTER_HOST": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "2",
    }
