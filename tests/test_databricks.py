"""Databricks bundle, notebooks and packaging, checked without a workspace."""

from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
import yaml

from imgfeat.cli import build_parser
from imgfeat.cli import notebook as nb
from imgfeat.store.tables import location_in

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.py")))
LOCAL_SUBSTITUTIONS = {
    "workspace.file_path": ROOT,
    "workspace.current_user.userName": "someone@example.com",
    "bundle.name": "imgfeat",
    "bundle.target": "dev",
}


# ---------------------------------------------------------------------------------------------
# helpers


def load_bundle() -> tuple[dict, dict[str, str]]:
    """databricks.yml with its included resource files merged; and where each job was defined."""
    with open(os.path.join(ROOT, "databricks.yml"), encoding="utf-8") as fh:
        bundle = yaml.safe_load(fh)
    defined_in: dict[str, str] = {}
    for pattern in bundle.get("include", []):
        files = sorted(glob.glob(os.path.join(ROOT, pattern)))
        assert files, f"include pattern {pattern!r} matches no file"
        for path in files:
            with open(path, encoding="utf-8") as fh:
                part = yaml.safe_load(fh)
            for kind, items in part.get("resources", {}).items():
                bundle.setdefault("resources", {}).setdefault(kind, {}).update(items)
                for name in items:
                    defined_in[f"{kind}.{name}"] = os.path.dirname(path)
    return bundle, defined_in


def job() -> tuple[dict, str]:
    bundle, defined_in = load_bundle()
    return bundle["resources"]["jobs"]["image_features"], defined_in["jobs.image_features"]


def tasks_by_key() -> dict[str, dict]:
    return {t["task_key"]: t for t in job()[0]["tasks"]}


def substitute(value: str, variables: dict[str, str]) -> str:
    """Resolve ${var.x} (bundle defaults) and ${workspace...} (local stand-ins) like `bundle deploy` would."""
    known = {**LOCAL_SUBSTITUTIONS, **{f"var.{k}": v for k, v in variables.items()}}

    def one(match: re.Match) -> str:
        assert match.group(1) in known, f"unknown reference ${{{match.group(1)}}}"
        return str(known[match.group(1)])

    for _ in range(3):  # variable defaults may refer to ${workspace...}
        value = re.sub(r"\$\{([^}]+)\}", one, str(value))
    return value


def variable_defaults() -> dict[str, str]:
    bundle, _ = load_bundle()
    return {name: str(spec.get("default", "")) for name, spec in bundle["variables"].items()}


def notebook_command(path: str) -> str:
    """The sub-command whose widgets a notebook declares: nb.declare_widgets(dbutils, "<command>")."""
    found = re.findall(r'declare_widgets\(dbutils,\s*"(\w+)"\)', open(path, encoding="utf-8").read())
    assert len(found) == 1, f"{path} must declare one command's widgets"
    return found[0]


def cli_options(command: str) -> set[str] | None:
    """The option strings `imgfeat <command>` accepts, or None when the command is not on this branch."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command not in sub.choices:
        return None
    return set(sub.choices[command]._option_string_actions)


def require_command(command: str) -> None:
    assert cli_options(command) is not None, f"`imgfeat {command}` is not a registered sub-command"


class FakeWidgets:
    """Stand-in for dbutils.widgets: text widgets, job parameters override their defaults."""

    def __init__(self, params: dict[str, str]):
        self.params = dict(params)
        self.declared: dict[str, str] = {}

    def text(self, name: str, default: str, label: str | None = None) -> None:
        self.declared[name] = default

    def get(self, name: str) -> str:
        if name not in self.declared:  # Databricks: InputWidgetNotDefined
            raise ValueError(f"No input widget named {name} is defined")
        return self.params.get(name, self.declared[name])


class FakeDbutils:
    def __init__(self, params: dict[str, str]):
        self.widgets = FakeWidgets(params)


def run_notebook(path: str, spark, params: dict[str, str]) -> dict:
    """Execute a Databricks source notebook locally: `spark`, `dbutils`, `display`, `displayHTML` provided."""
    shown: list = []
    html: list[str] = []
    namespace = {
        "__name__": "__notebook__",
        "spark": spark,
        "dbutils": FakeDbutils(params),
        "display": shown.append,
        "displayHTML": html.append,
    }
    source = open(path, encoding="utf-8").read()
    exec(compile(source, path, "exec"), namespace)
    unused = set(params) - set(namespace["dbutils"].widgets.declared)
    assert not unused, f"parameters {unused} are not widgets of {os.path.basename(path)}"
    namespace["_shown"], namespace["_html"] = shown, html
    return namespace


def task_params(task_key: str, **overrides: str) -> dict[str, str]:
    task = tasks_by_key()[task_key]
    variables = variable_defaults()
    params = {k: substitute(v, variables) for k, v in task["notebook_task"].get("base_parameters", {}).items()}
    return {**params, **overrides}


def notebook_path(task_key: str) -> str:
    task = tasks_by_key()[task_key]
    return os.path.normpath(os.path.join(job()[1], task["notebook_task"]["notebook_path"]))


# ---------------------------------------------------------------------------------------------
# the bundle


def test_bundle_has_wheel_artifact_variables_and_targets():
    bundle, _ = load_bundle()
    assert bundle["bundle"]["name"] == "imgfeat"
    (artifact,) = bundle["artifacts"].values()
    assert artifact["type"] == "whl"
    assert os.path.isfile(os.path.join(ROOT, artifact["path"], "setup.py"))
    assert "-m build --wheel" in artifact["build"] and "--outdir dist" in artifact["build"]
    variables = bundle["variables"]
    for name in ("image_root", "output_root", "experiment", "gpu_node_type", "cpu_node_type", "gpu_workers", "cpu_workers"):
        assert name in variables and variables[name].get("description"), name
    assert variables["experiment"]["default"].startswith("/Users/")
    for target in bundle["targets"].values():
        assert target.get("variables", {}).get("experiment", "/Users/").startswith("/Users/")
    assert bundle["targets"]["dev"] == {"default": True, "mode": "development"}
    assert bundle["targets"]["prod"]["mode"] == "production"
    # Every ${var.x} anywhere in the bundle is declared.
    text = open(os.path.join(ROOT, "databricks.yml")).read() + "".join(
        open(p).read() for p in glob.glob(os.path.join(ROOT, "resources", "*.yml"))
    )
    used = set(re.findall(r"\$\{var\.(\w+)\}", text))
    assert used and used <= set(variables), used - set(variables)


def test_job_chain_is_extract_then_train_then_compare():
    tasks = job()[0]["tasks"]
    assert [t["task_key"] for t in tasks] == ["extract", "train", "compare"]
    assert "depends_on" not in tasks[0]
    assert tasks[1]["depends_on"] == [{"task_key": "extract"}]
    assert tasks[2]["depends_on"] == [{"task_key": "train"}]


def test_every_named_file_exists_and_every_task_gets_the_wheel():
    spec, base = job()
    bundle, _ = load_bundle()
    artifact_dist = os.path.normpath(os.path.join(ROOT, next(iter(bundle["artifacts"].values()))["path"], "dist"))
    variables = variable_defaults()
    for task in spec["tasks"]:
        path = notebook_path(task["task_key"])
        assert os.path.isfile(path) and path.startswith(os.path.join(ROOT, "notebooks")), path
        wheels = [lib["whl"] for lib in task["libraries"] if "whl" in lib]
        assert len(wheels) == 1, task["task_key"]
        # The library glob points where the artifact's build writes the wheel.
        assert os.path.normpath(os.path.join(base, os.path.dirname(wheels[0]))) == artifact_dist
        assert os.path.basename(wheels[0]) == "*.whl"
        for name, value in task["notebook_task"].get("base_parameters", {}).items():
            if "${workspace.file_path}/" in str(value):  # files synced with the bundle
                local = substitute(value, variables)
                assert os.path.isfile(local), f"{task['task_key']}.{name}: {local} does not exist"


def test_extract_runs_on_a_gpu_ml_cluster_and_the_rest_on_a_cpu_one():
    spec, _ = job()
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in spec["job_clusters"]}
    variables = variable_defaults()
    tasks = tasks_by_key()
    gpu = clusters[tasks["extract"]["job_cluster_key"]]
    assert re.fullmatch(r"\d+\.\d+\.x-gpu-ml-scala2\.\d+", substitute(gpu["spark_version"], variables))
    assert float(gpu["spark_conf"]["spark.task.resource.gpu.amount"]) > 0
    for key in ("train", "compare"):
        cpu = clusters[tasks[key]["job_cluster_key"]]
        version = substitute(cpu["spark_version"], variables)
        assert "-ml-" in version and "gpu" not in version
        assert "spark.task.resource.gpu.amount" not in cpu.get("spark_conf", {})


@pytest.mark.parametrize("task_key", ["extract", "train", "compare"])
def test_task_parameters_are_widgets_and_accepted_by_the_cli_parser(task_key):
    command = notebook_command(notebook_path(task_key))
    assert command == task_key
    params = task_params(task_key)
    widgets = {w.name for w in nb.WIDGETS[command]}
    assert set(params) <= widgets, set(params) - widgets
    require_command(command)
    argvs = nb.argv_from_values(command, params)
    for argv in argvs:
        args, cfg = nb.parse_argv(argv)  # the CLI's own parser and config validation
        assert args.command == command
        assert build_parser().parse_args(argv).command == command
    if command == "extract":
        assert [c.model.name for c in (nb.parse_argv(a)[1] for a in argvs)] == ["efficientnet_lite0", "resnet50", "inception_v3"]
        cfg = nb.parse_argv(argvs[0])[1]
        assert cfg.output.path == "main.imgfeat.features" and cfg.errors_path == "main.imgfeat.features_errors"
        assert cfg.output.format == "auto" and cfg.inference.batch_size == 128 and cfg.inference.device == "gpu"


@pytest.mark.parametrize("command", sorted(nb.WIDGETS))
def test_every_notebook_widget_is_a_flag_of_its_command(command):
    require_command(command)
    options = cli_options(command)
    for widget in nb.WIDGETS[command]:
        if widget.name not in nb.NOTEBOOK_ONLY:
            assert "--" + widget.name.replace("_", "-") in options, f"{command}: widget {widget.name}"


def test_readme_and_docs_tell_the_deploy_command_every_variable_and_the_cluster_lines():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    docs = open(os.path.join(ROOT, "docs", "databricks.md"), encoding="utf-8").read()
    clusters = open(os.path.join(ROOT, "docs", "clusters.md"), encoding="utf-8").read()
    assert "databricks bundle deploy -t dev && databricks bundle run image_features" in readme
    for name in variable_defaults():
        assert f"`{name}`" in readme and f"`{name}`" in docs, name
    for text in (readme, clusters):
        submits = text.split("spark-submit --master")[1:]
        masters = [block.split()[0] for block in submits]
        assert any(m == "yarn" for m in masters) and any(m.startswith("k8s://") for m in masters)
        assert any(m.startswith("spark://") for m in masters)
        assert text.count("PYSPARK_PYTHON=./environment/bin/python spark-submit") >= 3
        assert text.count("--archives dist/imgfeat-env.tar.gz#environment") >= 3


# ---------------------------------------------------------------------------------------------
# widgets -> arguments


def test_widget_values_become_cli_arguments():
    argvs = nb.argv_from_values(
        "extract",
        {"input": "/imgs", "output_root": "/Volumes/main/x/out/", "model": "resnet50, inception_v3",
         "batch_size": "", "config": "a.yaml,b.yaml", "set": "inference.batch_size=64; model.seed=1\npreprocess.resize_mode=pad"},
    )
    common = ["extract", "--input", "/imgs", "--output", "/Volumes/main/x/out/features", "--config", "a.yaml",
              "--config", "b.yaml", "--set", "inference.batch_size=64", "--set", "model.seed=1",
              "--set", "preprocess.resize_mode=pad"]
    assert argvs == [common + ["--model", "resnet50"], common + ["--model", "inception_v3"]]
    # An explicit table wins over output_root; train reads what extract wrote.
    assert nb.argv_from_values("extract", {"output_root": "main.s", "output": "c.s.t"})[0] == ["extract", "--output", "c.s.t"]
    assert nb.argv_from_values("train", {"output_root": "main.s"})[0] == ["train", "--features", "main.s.features"]
    with pytest.raises(ValueError, match="unknown extract widget"):
        nb.argv_from_values("extract", {"ouput": "x"})


def test_location_in_folder_or_unity_catalog_schema():
    assert location_in("main.imgfeat", "features") == "main.imgfeat.features"
    assert location_in("dbfs:/imgfeat/", "features") == "dbfs:/imgfeat/features"
    assert location_in("/Volumes/main/imgfeat/out", "features") == "/Volumes/main/imgfeat/out/features"
    assert location_in("./out.v2", "features") == "./out.v2/features"
    with pytest.raises(ValueError, match="catalog.schema"):
        location_in("main.imgfeat.features", "features")
    with pytest.raises(ValueError, match="empty output root"):
        location_in(" ", "features")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"input": "/x", "output": "/y", "format": "csv"}, "invalid choice"),
        ({"input": "/x", "output": "/y", "set": "model.nmae=x"}, "unknown setting 'model.nmae'"),
        ({"input": "/x", "output": "/y", "model": "alexnet"}, "unknown backbone 'alexnet'"),
    ],
)
def test_bad_widget_values_raise_with_the_setting_named(values, message):
    (argv,) = nb.argv_from_values("extract", values)
    with pytest.raises(ValueError, match=re.escape(message)):
        nb.parse_argv(argv)


# ---------------------------------------------------------------------------------------------
# notebooks


def test_notebooks_are_databricks_source_and_parse_as_python():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"extract_features.py", "train_heads.py", "compare_runs.py"} <= names
    referenced = {os.path.basename(notebook_path(k)) for k in tasks_by_key()}
    assert referenced <= names
    for path in NOTEBOOKS:
        source = open(path, encoding="utf-8").read()
        assert source.splitlines()[0] == "# Databricks notebook source", path
        assert "\n# COMMAND ----------\n" in source and "# MAGIC %md" in source, path
        ast.parse(source, filename=path)
        notebook_command(path)


def test_extract_notebook_runs_locally_with_the_jobs_parameters(spark, samples, tmp_path):
    params = task_params(
        "extract", input=samples.root, output_root=str(tmp_path / "out"),
        model="tiny", weights="none", format="parquet", batch_size="8",
    )
    ns = run_notebook(notebook_path("extract"), spark, params)
    (result,) = ns["results"]
    assert (result.listed, result.featurized, result.failed) == (samples.valid + len(samples.bad), samples.valid, len(samples.bad))
    features = str(tmp_path / "out" / "features")
    assert result.features_path == features and result.errors_path == features + "_errors"
    table = spark.read.parquet(features)
    assert table.count() == samples.valid
    assert {r["split"] for r in table.select("split").distinct().collect()} <= {"train", "test"}  # split_mode hash
    assert spark.read.parquet(features + "_errors").count() == len(samples.bad)
    (shown,) = ns["_shown"]
    assert list(shown["featurized"]) == [samples.valid]
    # Incremental: the same notebook again featurizes nothing.
    again = run_notebook(notebook_path("extract"), spark, params)
    assert again["results"][0].processed == 0 and again["results"][0].already_done == result.listed


def test_train_and_compare_notebooks_run_locally(spark, samples, tmp_path):
    require_command("train")
    require_command("compare")
    root, uri = str(tmp_path / "out"), f"sqlite:///{tmp_path}/mlflow.db"
    experiment = "/Users/someone@example.com/imgfeat"
    # Local stand-ins for the Databricks-only settings: Parquet instead of Delta, a sqlite MLflow store,
    # no conf/databricks.yaml (tracking_uri databricks, Delta).
    run_notebook(notebook_path("extract"), spark, task_params(
        "extract", input=samples.root, output_root=root, model="tiny", weights="none", format="parquet",
        batch_size="8", config=""))
    trained = run_notebook(notebook_path("train"), spark, task_params(
        "train", output_root=root, experiment=experiment, tracking_uri=uri, register="", config=""))
    result = trained["result"]
    assert result.parent_run_id
    compared = run_notebook(notebook_path("compare"), spark, task_params(
        "compare", experiment=experiment, tracking_uri=uri, positive_class="PNEUMONIA", config=""))
    table = compared["table"]
    assert len(table) == 3  # one backbone x lr, rf, dt
    assert compared["_shown"][0] is table
    linked = compared["linked"]
    assert all(linked["run_url"].str.contains("/#/experiments/")) and all(linked["run_id"] != "")
    (html,) = compared["_html"]
    assert html.count("<a href=") == 3


def test_run_links_point_at_each_rows_newest_run(tmp_path):
    import mlflow
    import pandas as pd

    from imgfeat.config import load_config

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("/Users/someone@example.com/imgfeat")
    ids = {}
    for backbone, head in [("resnet50", "lr"), ("resnet50", "rf"), ("resnet50", "lr")]:
        run = client.create_run(exp_id, tags={"backbone": backbone, "head": head})
        client.set_terminated(run.info.run_id)
        ids[(backbone, head)] = run.info.run_id  # the last one per pair is the newest
    table = pd.DataFrame({"backbone": ["resnet50", "resnet50", "vgg19"], "head": ["rf", "lr", "dt"], "accuracy": [0.9, 0.8, 0.5]})
    cfg = load_config(overrides={"mlflow.experiment": "/Users/someone@example.com/imgfeat", "mlflow.tracking_uri": uri})
    linked = nb.with_run_links(table, cfg)
    assert list(linked["run_id"]) == [ids[("resnet50", "rf")], ids[("resnet50", "lr")], ""]
    assert linked["run_url"][0] == f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{ids[('resnet50', 'rf')]}"
    on_databricks = nb.with_run_links(table, cfg, host="https://adb-1.azuredatabricks.net")
    assert on_databricks["run_url"][1] == f"https://adb-1.azuredatabricks.net/ml/experiments/{exp_id}/runs/{ids[('resnet50', 'lr')]}"
    html = nb.links_html(linked)
    assert html.count("<a href=") == 2 and "0.9000" in html and "run_url" not in html
    with pytest.raises(ValueError, match="not found"):
        nb.with_run_links(table, load_config(overrides={"mlflow.experiment": "nope", "mlflow.tracking_uri": uri}))


# ---------------------------------------------------------------------------------------------
# packaging


def test_wheel_builds_and_contains_imgfeat_not_the_tests(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "lib"), src / "lib", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(os.path.join(ROOT, "tests"), src / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = glob.glob(str(out / "*.whl"))
    assert re.fullmatch(r"imgfeat-0\.1\.0-py3-none-any\.whl", os.path.basename(wheel))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("imgfeat/__init__.py", "imgfeat/cli/__init__.py", "imgfeat/cli/notebook.py", "imgfeat/featurize/extract.py",
                   "imgfeat/cli/extract.py", "imgfeat/py.typed"):
        assert module in names, module
    assert not [n for n in names if n.startswith(("tests/", "lib/", "notebooks/")) or "conftest" in n or "test_" in n]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "imgfeat = imgfeat.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_make_dist_packs_a_separate_env_and_leaves_the_dev_env_alone():
    plan = subprocess.run(["make", "-n", "dist"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-m build --wheel" in plan and "venv_pack" in plan and "dist/imgfeat-env.tar.gz" in plan
    lines = plan.splitlines()
    # (in a checkout without .venv, `make -n` first lists the setup of .venv itself: dist starts at its build)
    after_build = lines[next(i for i, line in enumerate(lines) if "-m build --wheel" in line):]
    installs = [line for line in after_build if "pip install" in line]
    assert installs and all(line.startswith("build/dist-env/bin/python") for line in installs), installs


@pytest.mark.integration
@pytest.mark.timeout(3600)
def test_packed_env_runs_the_extract_job_under_spark_submit(samples, tmp_path):
    """`make dist` first (slow). Client mode as in docs/clusters.md: the archive is shipped with --archives and
    unpacked once where we submit as ./environment (driver; in local mode also the workers' working directory)."""
    archive = os.path.join(ROOT, "dist", "imgfeat-env.tar.gz")
    if not os.path.isfile(archive):  # build it (minutes): a missing archive must not turn the test into a skip
        built = subprocess.run(["make", "dist"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert os.path.isfile(archive)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "environment")
    import pyspark

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYSPARK_DRIVER_PYTHON")}
    env.update(PYSPARK_PYTHON="./environment/bin/python", SPARK_HOME=os.path.dirname(pyspark.__file__))
    spark_submit = os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-submit")
    done = subprocess.run(
        [spark_submit, "--master", "local[2]", "--archives", f"{archive}#environment",
         os.path.join(ROOT, "jobs", "extract_features.py"), "--input", samples.root, "--output", "out/features",
         "--model", "tiny", "--weights", "none", "--format", "parquet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"featurized {samples.valid} + failed {len(samples.bad)}" in done.stdout
