"""Imports run one way (app -> routes -> deps -> state): a route module loads without the app."""

import subprocess
import sys

import pytest

ROUTES = ["routes_adapters", "routes_completions", "routes_dashboard", "routes_experiments", "routes_tasks"]


@pytest.mark.parametrize("module", ROUTES)
def test_route_module_imports_without_the_app(module: str) -> None:
    code = f"import sys, server.{module}; print('server.app' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
