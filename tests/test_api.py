"""Every CLI command is also a documented library function, and `import gptoss_convert` is cheap."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

import gptoss_convert
from conftest import run_env
from gptoss_convert.cli import main


def test_public_functions_resolve_and_are_documented():
    names = [n for n in gptoss_convert.__all__ if n != "__version__"]
    assert {"dequantize", "to_orbax", "golden", "verify_checkpoint", "check", "generate_from_checkpoint",
            "demo"} <= set(names)
    for n in names:
        fn = getattr(gptoss_convert, n)
        assert callable(fn) and fn.__doc__ and len(fn.__doc__.split()) > 5, n


def test_import_does_no_heavy_work():
    code = ("import sys, gptoss_convert; "
            "print(sorted(m for m in ('jax', 'torch', 'transformers', 'tensorstore') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env())
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_cli_lists_every_command():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for cmd in ("dequantize", "to-orbax", "golden", "verify", "generate", "check", "demo"):
        assert cmd in r.output
