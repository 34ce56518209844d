"""Build a validated ``Config``: defaults < YAML files < CLI flags < ``--set key=value``.

Every wrong key or value fails at start with a message that names the setting and where it came from.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
import warnings
from typing import Any, Literal

import yaml

from imgfeat.config.phi import patient_attribute
from imgfeat.config.schema import Config, ConfigError

# ---------------------------------------------------------------------------------------------
# building and validating


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently coerce) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not allowed; use one of {allowed}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _text_mapping(value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a whole number, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _text_mapping(value: dict[Any, Any], where: str, prefix: str = "") -> dict[str, str]:
    """A mapping setting (``spark.conf``: dotted key -> text). Nested mappings are flattened into dotted keys
    (``{spark: {sql: {shuffle.partitions: 4}}}`` -> ``spark.sql.shuffle.partitions``); booleans become true/false."""
    out: dict[str, str] = {}
    for k, v in value.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_text_mapping(v, where, key + "."))
        elif isinstance(v, bool):
            out[key] = "true" if v else "false"
        elif v is None or isinstance(v, list):
            raise ConfigError(f"{where}: {key!r} needs a text value, got {v!r} (a list: write it comma-separated)")
        else:
            out[key] = str(v)
    return out


# Renamed settings: old dotted name -> new name in the same section. The old name still loads, with a warning.
RENAMED = {"inference.tf_threads": "threads"}


def _renamed(key: str, where: str, source: str) -> str:
    """``key`` of the section ``where``, or its new name when it was renamed (said in a FutureWarning)."""
    dotted = f"{where}.{key}" if where else key
    if dotted not in RENAMED:
        return key
    warnings.warn(f"'{dotted}' (from {source}) is deprecated: it is now '{where}.{RENAMED[dotted]}'; rename it",
                  FutureWarning, stacklevel=4)
    return RENAMED[dotted]


def _merge_into(obj: Any, data: dict[str, Any], where: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for old_key, value in data.items():
        key = _renamed(old_key, where, source)
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            valid = ", ".join(sorted(names))
            raise ConfigError(
                f"unknown setting '{dotted}' (from {source}); valid keys"
                f"{' under ' + repr(where) if where else ''}: {valid}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' (from {source}) must be a mapping, got {value!r}")
            _merge_into(current, value, dotted, source)
        elif isinstance(current, dict) and isinstance(value, dict):
            current.update(_coerce(value, hints[key], f"'{dotted}' (from {source})"))
        else:
            setattr(obj, key, _coerce(value, hints[key], f"'{dotted}' (from {source})"))


def _validate(cfg: Config) -> None:
    checks = [
        (cfg.inference.batch_size >= 1, "inference.batch_size must be >= 1"),
        (cfg.inference.threads >= 0, "inference.threads must be >= 0 (0 = automatic)"),
        (cfg.inference.arrow_batch_rows >= 1, "inference.arrow_batch_rows must be >= 1"),
        (cfg.inference.images_per_task >= 0, "inference.images_per_task must be >= 0 (0 = automatic)"),
        (cfg.inference.decode_threads >= 1, "inference.decode_threads must be >= 1"),
        (0.0 < cfg.input.split.test_fraction < 1.0, "input.split.test_fraction must be in (0, 1)"),
        (0.0 < cfg.train.test_fraction < 1.0, "train.test_fraction must be in (0, 1)"),
        (cfg.input.label.folder_level >= 1, "input.label.folder_level must be >= 1"),
        (cfg.input.split.folder_level >= 1, "input.split.folder_level must be >= 1"),
        (cfg.preprocess.image_size == 0 or cfg.preprocess.image_size >= 32, "preprocess.image_size must be 0 or >= 32"),
        (cfg.input.max_file_bytes > 0, "input.max_file_bytes must be > 0"),
        (cfg.preprocess.max_pixels > 0, "preprocess.max_pixels must be > 0"),
        (cfg.train.cv_folds == 0 or cfg.train.cv_folds >= 2, "train.cv_folds must be 0 or >= 2"),
        (0.0 <= cfg.train.validation_fraction < 1.0, "train.validation_fraction must be in [0, 1)"),
        (0.0 <= cfg.train.threshold_fraction < 0.5, "train.threshold_fraction must be in [0, 0.5)"),
        (cfg.train.keras.epochs >= 1, "train.keras.epochs must be >= 1"),
        (cfg.train.keras.batch_size >= 1, "train.keras.batch_size must be >= 1"),
        (cfg.train.keras.hidden_units >= 0, "train.keras.hidden_units must be >= 0 (0 = softmax only)"),
        (cfg.input.split.group != "regex" or bool(cfg.input.split.group_pattern),
         "input.split.group=regex needs input.split.group_pattern (a regex with one group, or kermany | nih)"),
        (cfg.input.split.group != "manifest_column" or bool(cfg.input.split.group_column and cfg.input.label.manifest),
         "input.split.group=manifest_column needs input.split.group_column and input.label.manifest"),
        (cfg.input.split.group != "patient_key" or bool(cfg.privacy.id_salt or os.environ.get("IMGFEAT_ID_SALT")),
         "input.split.group=patient_key needs a secret to key PatientID with: set privacy.id_salt or $IMGFEAT_ID_SALT "
         "(the raw PatientID is never stored)"),
        (cfg.input.label.mode != "dicom_tag" or bool(cfg.input.label.dicom_tag),
         "input.label.mode=dicom_tag needs input.label.dicom_tag (a DICOM keyword, e.g. StudyDescription)"),
        (re.fullmatch(r"auto|none|lung|mediastinum|bone|-?[\d.]+\s*,\s*[\d.]+", cfg.preprocess.dicom.window.strip().lower()) is not None,
         f"preprocess.dicom.window={cfg.preprocess.dicom.window!r}: use auto, none, lung, mediastinum, bone or C,W "
         "(centre, width in modality units, e.g. -600,1500)"),
        (re.fullmatch(r"middle|mip|slices:[1-9]\d*", cfg.preprocess.volume.strip().lower()) is not None,
         f"preprocess.volume={cfg.preprocess.volume!r}: use middle, mip or slices:N (N >= 1)"),
        (cfg.train.validity.bootstrap_resamples == 0 or cfg.train.validity.bootstrap_resamples >= 100,
         "train.validity.bootstrap_resamples must be 0 (no intervals) or >= 100"),
        (0.5 < cfg.train.validity.confidence < 1.0, "train.validity.confidence must be in (0.5, 1)"),
        (0.0 < cfg.train.validity.target_sensitivity < 1.0, "train.validity.target_sensitivity must be in (0, 1)"),
        (0 <= cfg.train.validity.near_duplicate_bits <= 63, "train.validity.near_duplicate_bits must be in 0..63"),
        (cfg.train.validity.calibration_bins >= 2, "train.validity.calibration_bins must be >= 2"),
        (
            cfg.input.label.mode != "manifest" or bool(cfg.input.label.manifest),
            "input.label.mode=manifest needs input.label.manifest (a CSV with path,label)",
        ),
        (
            cfg.input.label.mode not in ("folder", "none") or not cfg.input.label.manifest,
            f"input.label.manifest is given but input.label.mode={cfg.input.label.mode} would ignore it; "
            "drop --label-mode (a manifest implies manifest labels) or drop the manifest",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_labels(cfg)
    _validate_privacy_and_limits(cfg)
    sha = cfg.model.weights_sha256
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha.lower())):
        raise ConfigError("model.weights_sha256 must be 64 hexadecimal characters")


def _one_group_regex(setting: str, value: str | None, example: str) -> None:
    """``value`` (when set) compiles and has exactly one capture group, else a ConfigError naming ``setting``."""
    if value is None:
        return
    try:
        groups = re.compile(value).groups
    except re.error as exc:
        raise ConfigError(f"{setting}={value!r} is not a valid regex: {exc}") from None
    if groups != 1:
        raise ConfigError(f"{setting}={value!r} has {groups} capture groups; it needs exactly one, e.g. {example}")


def _validate_labels(cfg: Config) -> None:
    """Multi-label and study settings: what they need, and regexes with one group."""
    label, study = cfg.input.label, cfg.input.study
    mode = label.effective_mode
    if label.is_multi and mode != "manifest":
        what = "input.label.multi.column" if label.multi.column else "input.label.findings"
        raise ConfigError(f"{what} reads findings from a manifest: set input.label.manifest (a .csv, .csv.gz or "
                          f".parquet) and leave input.label.mode at auto or manifest (it is {label.mode})")
    if len(set(label.findings)) != len(label.findings) or any(not f.strip() for f in label.findings):
        raise ConfigError(f"input.label.findings={label.findings!r}: names must be non-empty and distinct")
    if label.is_multi and label.multi.column and not label.multi.sep:
        raise ConfigError("input.label.multi.sep must not be empty (NIH ChestX-ray14 uses |)")
    if not label.path_column.strip():
        raise ConfigError("input.label.path_column must name the manifest's path column (default: path)")
    if study.column and mode != "manifest":
        raise ConfigError(f"input.study.column={study.column!r} is a manifest column: set input.label.manifest, or "
                          "take the study from the path with input.study.pattern (e.g. ^(.*)/[^/]+$, the folder)")
    if label.folder_pattern is not None and mode != "folder":
        raise ConfigError(f"input.label.folder_pattern applies to folder labels, but input.label.mode={mode} would "
                          "ignore it; drop one of them")
    _one_group_regex("input.label.folder_pattern", label.folder_pattern, r"^study\d+_(\w+)$")
    _one_group_regex("input.study.pattern", study.pattern, r"^(.*)/[^/]+$")


ARROW_MAX_BYTES = 2**31 - 1  # Spark's limit for spark.sql.execution.arrow.maxBytesPerBatch


def _validate_privacy_and_limits(cfg: Config) -> None:
    """No patient field as a label source; Arrow batches bounded in bytes within Spark's limit."""
    tag = cfg.input.label.dicom_tag
    attribute = patient_attribute(tag) if tag else None
    if attribute and cfg.input.label.effective_mode == "dicom_tag":
        raise ConfigError(
            f"input.label.dicom_tag={tag!r} names {attribute}, a patient/study identifier, which must not become a "
            "label: labels are logged to MLflow (params, reports) and stored in every row. Label by a clinical "
            "attribute (e.g. StudyDescription, BodyPartExamined, ViewPosition) or write a manifest (path,label) with "
            "labels derived from it")
    rows, size, batch = cfg.inference.arrow_batch_rows, cfg.input.max_file_bytes, cfg.inference.arrow_batch_bytes
    if not 1 <= batch <= ARROW_MAX_BYTES:
        raise ConfigError(
            f"inference.arrow_batch_bytes={batch} must be in 1..{ARROW_MAX_BYTES} (Spark's limit); with "
            f"arrow_batch_rows={rows} and input.max_file_bytes={size}, a batch holds at most "
            "min(rows x file size, arrow_batch_bytes + one file) bytes")


def _setting_keys(keys: list[str]) -> list[str]:
    """Dotted keys as the settings see them: below a mapping setting (``spark.conf``) the rest is one key, so
    ``spark.conf.spark.sql.shuffle.partitions`` -> ``['spark', 'conf', 'spark.sql.shuffle.partitions']``."""
    tp: Any = Config
    for i, key in enumerate(keys[:-1]):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if key not in hints:
            break  # not a setting: _merge_into names it
        tp = hints[key]
        if typing.get_origin(tp) is dict:
            return [*keys[: i + 1], ".".join(keys[i + 1:])]
    return keys


def parse_set(item: str) -> tuple[list[str], Any]:
    """``'model.name=resnet50'`` -> (['model', 'name'], 'resnet50'); the value is read as YAML. Below a mapping
    setting the rest of the key is one key: ``spark.conf.spark.sql.shuffle.partitions=4`` sets that Spark key."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set inference.batch_size=64")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return _setting_keys(key.strip().split(".")), value


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for k in reversed(keys):
        out = {k: out}
    return out


def load_config(
    files: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> Config:
    """Build the config: defaults, then each YAML file, then ``overrides`` (dotted keys), then ``sets``."""
    cfg = Config()
    for path in files or []:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of settings")
        _merge_into(cfg, data, "", path)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _merge_into(cfg, _nest(_setting_keys(dotted.split(".")), value), "", "command-line flag")
    for item in sets or []:
        keys, value = parse_set(item)
        _merge_into(cfg, _nest(keys, value), "", f"--set {item}")
    _validate(cfg)
    return cfg
