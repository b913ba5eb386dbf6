"""engines/torch_cxx.py: the torch backend never compiles packages with a C++ compiler whose
shared objects cannot be loaded next to torch.

The broken compiler of the H200 machine ($CXX: g++ linking libstdc++ statically into shared
objects) is rebuilt here as a wrapper script around g++, which reproduces the failure on this
machine: a package it builds aborts the process at load (std::bad_cast; SIGSEGV there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dsv3_export.engines import torch_cxx
from dsv3_export.engines.base import BackendUnavailable
from dsv3_export.engines.torch import compile_package, package_info

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="needs g++ on PATH")


@pytest.fixture(scope="module")
def static_gxx(tmp_path_factory) -> str:
    """A compiler like the H200 machine's $CXX: shared objects get libstdc++ linked in statically."""
    path = tmp_path_factory.mktemp("cxx") / "g++-static-libstdc++"
    path.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -shared ] && exec {GXX} "$@" -static-libstdc++; done\n'
                    f'exec {GXX} "$@"\n')
    path.chmod(0o755)
    reason = torch_cxx.check_cxx(str(path))
    if reason is None or reason.startswith("cannot build"):
        pytest.skip(f"g++ -static-libstdc++ does not reproduce the broken compiler here: {reason}")
    return str(path)


@pytest.fixture
def inductor_default(monkeypatch):
    """Set the compiler Inductor would use unconfigured (what $CXX sets at import)."""
    from torch._inductor import config

    monkeypatch.delenv(torch_cxx.CXX_ENV, raising=False)
    with contextlib.ExitStack() as stack:
        yield lambda cxx: stack.enter_context(config.patch({"cpp.cxx": (None, cxx)}))


def test_a_working_compiler_passes_the_check():
    assert torch_cxx.check_cxx(GXX) is None


def test_the_broken_compiler_is_named_with_what_happens(static_gxx):
    reason = torch_cxx.check_cxx(static_gxx)
    assert "when loaded next to torch" in reason and ("SIG" in reason or "exits" in reason), reason


def test_selection_skips_the_broken_default_and_says_why(static_gxx, inductor_default):
    inductor_default(static_gxx)
    choice = torch_cxx.select_cxx()
    assert choice.path != static_gxx and torch_cxx.check_cxx(choice.path) is None
    assert list(choice.rejected) == [static_gxx]
    assert choice.record()["rejected"][static_gxx] == torch_cxx.check_cxx(static_gxx)


def test_an_unrunnable_inductor_default_falls_back(tmp_path, inductor_default):
    """$CXX="ccache g++" or a missing file: Inductor cannot run it (InvalidCxxCompiler), but the
    backend sets cpp.cxx itself, so a working g++ must still be chosen rather than the build refused."""
    inductor_default(str(tmp_path / "no-such-g++"))
    assert torch_cxx.check_cxx(torch_cxx.select_cxx().path) is None


def test_package_info_for_cpu_uses_the_chosen_compiler_throughout(tmp_path):
    """device_info("cpu") asks Inductor for the CPU's vector ISA, which compiles probes with
    Inductor's own compiler; with $CXX unrunnable that must be the chosen one too. A fresh process:
    $CXX is read when Inductor's config is imported, and the ISA probes are cached per process."""
    code = "from dsv3_export.engines.torch import package_info; i = package_info('cpu'); print(i['cxx']['path'])"
    env = {k: v for k, v in os.environ.items() if k != torch_cxx.CXX_ENV}
    env.update(CXX=str(tmp_path / "no-such-g++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0 and run.stdout.strip(), f"exit {run.returncode}: {run.stderr[-2000:]}"
    assert torch_cxx.check_cxx(run.stdout.strip().splitlines()[-1]) is None


def test_a_broken_compiler_early_on_path_does_not_hide_a_working_one(static_gxx, inductor_default, tmp_path,
                                                                       monkeypatch):
    """As a wrapper directory put first on PATH would (the H200 machine's /opt/gcc/bin): every
    fallback name there is broken; the working g++ further down PATH is found."""
    for name in torch_cxx.FALLBACKS:
        (tmp_path / name).symlink_to(static_gxx)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    inductor_default(str(tmp_path / "g++"))
    choice = torch_cxx.select_cxx()
    assert not choice.path.startswith(str(tmp_path)) and torch_cxx.check_cxx(choice.path) is None
    assert list(choice.rejected) == [str(tmp_path / "g++")]


def test_a_forced_compiler_that_fails_is_an_error_naming_it(static_gxx, monkeypatch):
    monkeypatch.setenv(torch_cxx.CXX_ENV, static_gxx)
    with pytest.raises(RuntimeError, match=rf"{torch_cxx.CXX_ENV}.*") as info:
        torch_cxx.select_cxx()
    assert static_gxx in str(info.value) and "loaded next to torch" in str(info.value)


def test_a_missing_forced_compiler_is_refused_by_the_backend(tmp_path, monkeypatch):
    missing = str(tmp_path / "no-such-g++")
    monkeypatch.setenv(torch_cxx.CXX_ENV, missing)
    with pytest.raises(BackendUnavailable, match="no usable C\\+\\+ compiler") as info:
        package_info("cpu")
    assert missing in str(info.value) and "cannot run it" in str(info.value)


_LOAD_AND_RUN = """
import sys, torch
from safetensors.torch import load_file
from dsv3_export.engines.torch_step import attach_weights, load_package
package, tensors = sys.argv[1], load_file(sys.argv[2])
model = load_package(package, torch.device("cpu"))
kept = attach_weights(model, package, {"weight": tensors["weight"]}, torch.device("cpu"))
torch.testing.assert_close(model(tensors["x"]), tensors["want"])
print("ran")
"""


def test_packages_compiled_under_the_broken_default_load_and_run(static_gxx, inductor_default, tmp_path):
    """The regression: with the broken compiler as Inductor's default, a package compiled as the
    backend compiles (package_info -> compile_package) loads and runs in a fresh process; before
    engines/torch_cxx.py it was compiled by the default and aborted the loading process."""
    from safetensors.torch import save_file

    class Doubled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 5, generator=torch.Generator().manual_seed(7)))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight) * 2

    inductor_default(static_gxx)
    module, x = Doubled().eval(), torch.randn(3, 5)
    info = {**package_info("cpu"), "march": None}  # this test is about the compiler, not the ISA
    assert info["cxx"]["path"] != static_gxx and static_gxx in info["cxx"]["rejected"]
    package = compile_package(torch.export.export(module, (x,)), "decode", tmp_path / "decode.pt2", info)
    with torch.no_grad():
        save_file({"weight": module.weight.detach().clone(), "x": x, "want": module(x)}, str(tmp_path / "t.safetensors"))
    run = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(package), str(tmp_path / "t.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ran" in run.stdout, f"exit {run.returncode}: {run.stderr[-2000:]}"


def test_build_is_refused_before_the_export_when_no_compiler_works(tmp_path, monkeypatch):
    from dsv3_export import build

    missing = str(tmp_path / "no-such-g++")
    monkeypatch.setenv(torch_cxx.CXX_ENV, missing)
    monkeypatch.setattr(build, "_load_model", lambda *a, **k: pytest.fail("the model was loaded for export"))
    with pytest.raises(BackendUnavailable, match="no usable C\\+\\+ compiler") as info:
        build.build_engine(build.BuildOptions(backend="torch", out=tmp_path / "engine"))
    assert missing in str(info.value) and not (tmp_path / "engine").exists()
