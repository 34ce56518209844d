import dataclasses

import pytest
import yaml

from imgfeat.config import Config, ConfigError, load_config, parse_set


def test_default_yaml_documents_the_builtin_defaults():
    with open("conf/default.yaml") as fh:
        documented = yaml.safe_load(fh)
    assert documented == dataclasses.asdict(Config())


@pytest.mark.parametrize("overlay", ["conf/local.yaml", "conf/databricks.yaml"])
def test_overlays_load(overlay):
    cfg = load_config([overlay])
    assert cfg.output.format in ("parquet", "delta")


def test_precedence_file_then_flags_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {name: inception_v3}\ninference: {batch_size: 8}\n")
    cfg = load_config([str(f)], {"inference.batch_size": 16}, ["inference.batch_size=64", "output.format=parquet"])
    assert cfg.model.name == "inception_v3"
    assert cfg.inference.batch_size == 64
    assert cfg.output.format == "parquet"


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: {nmae: resnet50}\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'model.nmae' \(from .*bad.yaml\).*name"):
        load_config([str(f)])


@pytest.mark.parametrize(
    "item, message",
    [
        ("output.format=csv", "output.format"),
        ("inference.batch_size=lots", "inference.batch_size"),
        ("inference.batch_size=0", "batch_size must be >= 1"),
        ("input.split.test_fraction=1.5", "test_fraction"),
        ("model.weights_sha256=abc", "64 hexadecimal"),
        ("nosuch=1", "unknown setting 'nosuch'"),
    ],
)
def test_wrong_values_fail_with_the_setting_named(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(sets=[item])


def test_parse_set_reads_yaml_values():
    assert parse_set("inference.warmup=true") == (["inference", "warmup"], True)
    assert parse_set("input.extensions=[jpg, png]") == (["input", "extensions"], ["jpg", "png"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_set("nonsense")


def test_errors_path_defaults_next_to_output():
    cfg = load_config(sets=["output.path=/data/feats/"])
    assert cfg.errors_path == "/data/feats_errors"


def test_registries_check_their_own_names():
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.train.heads import check_heads

    with pytest.raises(ConfigError, match="model.name: unknown backbone 'alexnet'"):
        get_backbone("alexnet")
    with pytest.raises(ConfigError, match="train.heads: unknown head.*xgb"):
        check_heads(["lr", "xgb"])


def test_the_renamed_tf_threads_setting_still_loads_with_a_warning(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("inference: {tf_threads: 3}\n")
    with pytest.warns(FutureWarning, match=r"'inference.tf_threads' \(from .*old.yaml\) is deprecated.*inference.threads"):
        assert load_config([str(f)]).inference.threads == 3
    with pytest.warns(FutureWarning, match="inference.tf_threads"):
        assert load_config(sets=["inference.tf_threads=2"]).inference.threads == 2
    with pytest.raises(ConfigError, match="inference.threads must be >= 0"), pytest.warns(FutureWarning):
        load_config(sets=["inference.tf_threads=-1"])
    assert load_config(sets=["inference.threads=4"]).inference.threads == 4
