"""The local JVM's class-data archive: used only when whole, keyed by Java and pyspark, built and validated."""

from __future__ import annotations

import json
import os

import pytest

from imgfeat import jvm_archive


def _fake_archive(size: int, recorded: int | None) -> str:
    archive = jvm_archive.archive_path()
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(b"\0" * size)
    if recorded is not None:
        archive.with_suffix(".json").write_text(json.dumps({"size": recorded}))
    return str(archive)


def test_an_archive_is_used_only_when_whole_and_not_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGFEAT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(jvm_archive.DISABLE_ENV, raising=False)
    assert jvm_archive.java_options() == ""  # none built
    path = _fake_archive(1000, None)
    assert jvm_archive.java_options() == ""  # never validated (no size recorded)
    _fake_archive(1000, 4096)
    assert jvm_archive.java_options() == ""  # truncated since: mapping it would crash the JVM
    _fake_archive(4096, 4096)
    options = jvm_archive.java_options()
    assert f"-XX:SharedArchiveFile={path}" in options and "-Xshare:auto" in options
    monkeypatch.setenv(jvm_archive.DISABLE_ENV, "0")
    assert jvm_archive.java_options() == ""


def test_another_java_looks_for_its_own_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGFEAT_CACHE_DIR", str(tmp_path))
    ours = jvm_archive.archive_path()
    other = tmp_path / "jdk" / "bin"
    other.mkdir(parents=True)
    (other / "java").write_text("#!/bin/sh\n")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    theirs = jvm_archive.archive_path()
    assert ours is not None and theirs is not None and ours != theirs and ours.parent == theirs.parent


def test_the_local_session_starts_its_jvm_from_the_archive_when_there_is_one(spark):
    options = spark.sparkContext.getConf().get("spark.driver.extraJavaOptions", "")
    archive = jvm_archive.java_options()  # as when the session was built (make setup builds it first)
    assert "-XX:TieredStopAtLevel=1" in options
    assert ("-XX:SharedArchiveFile=" in options) == bool(archive)


@pytest.mark.integration
def test_an_archive_is_built_validated_and_installed(tmp_path, monkeypatch):
    """~50 s: a JVM writes the archive as it exits, a second one must start from it (-Xshare:on)."""
    monkeypatch.setenv("IMGFEAT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(jvm_archive.DISABLE_ENV, raising=False)
    archive = jvm_archive.build()
    assert archive is not None and archive.is_file() and archive.stat().st_size > 10 * 2**20
    assert str(archive) in jvm_archive.java_options()
    assert not [p for p in os.listdir(archive.parent) if p.endswith(".tmp")]
    assert jvm_archive.build() == archive  # idempotent: kept
