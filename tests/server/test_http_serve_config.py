"""`loraplex serve` settings: flags, the YAML config file, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.task_table import TaskRoute, TaskTableError
from server.cli import build_parser
from server.serve_command import ServeConfigError, settings_from_args

EXAMPLE = Path(__file__).parents[2] / "examples" / "serve_config.yaml"


def parse(*argv: str):
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_flags_become_settings():
    settings = parse(
        "--model", "/m", "--adapter", "a=/ads/a", "--adapter", "b=/ads/b", "--task", "t=a", "--task", "x=a:0.9,b:0.1",
        "--max-loras", "4", "--max-queued", "9", "--port", "9000", "--adapter-root", "/ads", "--strict-base",
    )
    assert settings.model == "/m" and settings.port == 9000 and settings.host == "127.0.0.1"
    assert settings.adapters == {"a": "/ads/a", "b": "/ads/b"}
    assert settings.tasks == {"t": TaskRoute.single("a"), "x": TaskRoute.weighted({"a": 0.9, "b": 0.1})}
    assert settings.engine.max_loras == 4 and settings.engine.max_queued == 9 and settings.engine.strict_base
    assert settings.adapter_roots == ["/ads"] and settings.api_keys is None


def test_config_file_with_flags_on_top(tmp_path):
    (tmp_path / "keys.yaml").write_text("sk-admin-0000: {admin: true}\n")
    config = tmp_path / "serve.yaml"
    config.write_text(
        "model: default\nport: 8100\nmax_loras: 2\nadapters: {a: ads/a}\n"
        "tasks: {t: a, ab: {arms: {a: 1, b: 3}}}\nadapter_roots: [ads]\napi_keys: keys.yaml\n"
    )
    settings = parse("--config", str(config), "--port", "8200", "--adapter", "b=/elsewhere/b")
    assert settings.port == 8200 and settings.engine.max_loras == 2 and settings.model == "default"
    assert settings.adapters == {"a": str(tmp_path / "ads" / "a"), "b": "/elsewhere/b"}
    assert settings.tasks["ab"] == TaskRoute.weighted({"a": 1, "b": 3})
    assert settings.adapter_roots == [str(tmp_path / "ads")]
    assert settings.api_keys is not None and len(settings.api_keys) == 1


def test_example_config_parses():
    settings = parse("--config", str(EXAMPLE))
    assert settings.model == "default" and settings.engine.max_running == 16


@pytest.mark.parametrize(
    "text, words",
    [("modle: x\n", "unknown setting"), ("- a\n", "mapping"), ("adapters: [a]\n", "must be a mapping"), ("a: [\n", "not valid YAML")],
)
def test_bad_config_files(tmp_path, text, words):
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    with pytest.raises(ServeConfigError, match=words):
        parse("--config", str(config))


def test_bad_flags():
    with pytest.raises(ServeConfigError, match="NAME=PATH"):
        parse("--adapter", "nopath")
    with pytest.raises(TaskTableError, match="TASK=ADAPTER"):
        parse("--task", "t")


def test_multi_tenant_safety_flags_and_config(tmp_path):
    settings = parse(
        "--metrics-public", "--tenant-max-running", "3", "--limit-concurrency", "40", "--header-timeout", "2.5",
        "--body-timeout", "7", "--raw-special-tokens",
    )
    assert settings.metrics_public and settings.raw_special_tokens and settings.limit_concurrency == 40
    assert settings.header_timeout == 2.5 and settings.body_timeout == 7 and settings.keep_alive_timeout == 5.0
    assert parse().body_timeout == 30.0
    with pytest.raises(ServeConfigError, match=r"body_timeout \(--body-timeout\) must be a number of seconds > 0"):
        parse("--body-timeout", "0")
    assert settings.tenant_limits.max_running == 3 and settings.tenant_limits.max_queued is None
    config = tmp_path / "serve.yaml"
    config.write_text("tenant_max_queued: 7\nkeep_alive_timeout: 1\nmetrics_public: true\nbody_timeout: 12\n")
    from_file = parse("--config", str(config))
    assert from_file.tenant_limits.max_queued == 7 and from_file.keep_alive_timeout == 1 and from_file.metrics_public
    assert from_file.body_timeout == 12
    assert not parse().metrics_public and not parse().raw_special_tokens


def test_prefix_cache_is_on_by_default_and_turns_off_by_flag_or_config(tmp_path):
    assert parse().engine.prefix_cache is True
    assert parse("--no-prefix-cache").engine.prefix_cache is False
    assert parse("--prefix-cache-mb", "64").engine.prefix_cache_mb == 64
    config = tmp_path / "serve.yaml"
    config.write_text("prefix_cache: false\nprefix_cache_mb: 32\n")
    settings = parse("--config", str(config))
    assert settings.engine.prefix_cache is False and settings.engine.prefix_cache_mb == 32
    with pytest.raises(ServeConfigError, match=r"--prefix-cache-mb\) must be a number of MiB >= 0, got -1"):
        parse("--prefix-cache-mb", "-1")


def test_merging_single_adapter_batches_is_on_by_default_and_turns_off_by_flag_or_config(tmp_path):
    assert parse().engine.merge_single_adapter is True
    assert parse("--no-merge-single-adapter").engine.merge_single_adapter is False
    config = tmp_path / "serve.yaml"
    config.write_text("merge_single_adapter: false\n")
    assert parse("--config", str(config)).engine.merge_single_adapter is False
    config.write_text("merge_single_adapter: 'no'\n")  # a string, which would read as true
    with pytest.raises(ServeConfigError, match=r"merge_single_adapter \(--no-merge-single-adapter\) must be true or false, got 'no'"):
        parse("--config", str(config))
