"""`loraplex serve` flags and config keys of the dashboard: `--no-dashboard`, `--runs-dir`."""

from __future__ import annotations

import pytest

from server.cli import build_parser
from server.serve_command import ServeConfigError, settings_from_args


def parse(*argv: str):
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_dashboard_is_on_unless_turned_off():
    assert parse().dashboard is True
    assert parse("--no-dashboard").dashboard is False


def test_runs_dir_flag_and_config_key(tmp_path):
    (tmp_path / "runs").mkdir()
    assert parse("--runs-dir", str(tmp_path / "runs")).runs_dir == str(tmp_path / "runs")
    config = tmp_path / "serve.yaml"
    config.write_text("runs_dir: runs\ndashboard: false\n")  # relative to the config file
    settings = parse("--config", str(config))
    assert settings.runs_dir == str(tmp_path / "runs") and settings.dashboard is False
    assert parse("--config", str(config), "--runs-dir", str(tmp_path)).runs_dir == str(tmp_path)


def test_runs_dir_must_be_a_folder(tmp_path):
    with pytest.raises(ServeConfigError, match="--runs-dir .* is not a folder"):
        parse("--runs-dir", str(tmp_path / "absent"))
