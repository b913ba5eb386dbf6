"""The engine-rewrite tests' runner: a script (export a tiny program, rewrite, lower, run or trace it)
in a fresh interpreter, its last stdout line a JSON result.

Why a subprocess: the interpreter mode (TRITON_INTERPRET=1) must be set before triton is imported, and
the traced mode needs it unset (wrap_triton takes real JITFunctions); a test process has already
imported triton one way. SCRIPT_PREAMBLE reads the mode and seed (argv) and sets the variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT_PREAMBLE = r'''
import os, sys, json
mode, seed = sys.argv[1], int(sys.argv[2])
if mode == "interpret":
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)  # traced kernels must be real JITFunctions for wrap_triton
'''


def run_script(script: str, mode: str, seed: int = 0, env: dict[str, str] | None = None) -> dict:
    """Run SCRIPT_PREAMBLE + script's body with (mode, seed) and env added to the environment -> its
    JSON result."""
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", script, mode, str(seed % 2**31)], check=False,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
