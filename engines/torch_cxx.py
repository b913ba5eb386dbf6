"""The C++ compiler that AOTInductor builds a package's shared object with, checked before a build.

Why: a compiler can build packages that cannot be loaded. On the H200 machine `$CXX` (which
Inductor uses) is a wrapper around g++ that links libstdc++ statically into shared objects. The
package's .so then carries its own copy of the C++ library's locale machinery beside the process's
libstdc++.so.6 (which torch uses), and the std::regex that AOTInductor builds at load to parse the
device string fails: SIGSEGV there, std::bad_cast here (benchmarks/RESULTS.md, session 3). Nothing
in the compiler's name or version says so, and a build takes minutes before the load would fail, so
the build first compiles a probe library that does the same (std::regex on a device string), loads
it into a child process that imported torch, and uses the first compiler that passes:

    choice = select_cxx()    # $DSV3_TORCH_CXX alone if set; else Inductor's default, then g++, c++, clang++ on PATH
    inductor_configs["cpp.cxx"] = (None, choice.path)

`choice.rejected` says which compilers failed and why (the build prints it and the manifest keeps it).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CXX_ENV = "DSV3_TORCH_CXX"
FALLBACKS = ("g++", "c++", "clang++")
_PROBE_SYMBOL = "dsv3_cxx_probe"
_PROBE_SOURCE = r"""
#include <regex>
#include <string>
// What an AOTInductor package does when it is loaded (torch::aot_inductor::parse_device_str).
extern "C" int dsv3_cxx_probe() {
  std::regex pattern("(cpu|cuda|xpu|mps)(:([0-9]+))?");
  std::smatch match;
  std::string device = "cuda:0";
  return std::regex_match(device, match, pattern) && match[3] == "0" ? 42 : 1;
}
"""
_LOADER = (f"import ctypes, sys, torch; "
           f"sys.exit(0 if ctypes.CDLL(sys.argv[1]).{_PROBE_SYMBOL}() == 42 else 3)")


@dataclass(frozen=True)
class CxxChoice:
    path: str
    version: str
    rejected: dict[str, str] = field(default_factory=dict)  # compiler -> why it was not used

    def record(self) -> dict:
        return {"path": self.path, "version": self.version, "rejected": dict(self.rejected)}


def inductor_default_cxx() -> str:
    """The compiler Inductor would use unconfigured ($CXX, else g++)."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    return get_cpp_compiler()


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


@functools.lru_cache(maxsize=None)
def check_cxx(cxx: str, timeout_s: float = 180.0) -> str | None:
    """None when shared objects built by `cxx` run inside a torch process; else why not."""
    with tempfile.TemporaryDirectory(prefix="dsv3_cxx_") as tmp:
        source, library = Path(tmp) / "probe.cpp", Path(tmp) / "libprobe.so"
        source.write_text(_PROBE_SOURCE)
        try:
            built = subprocess.run([cxx, "-shared", "-fPIC", "-O1", "-std=c++17", str(source), "-o", str(library)],
                                   capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"cannot run it: {type(e).__name__}: {e}"
        if built.returncode != 0:
            return f"cannot build a shared library (exit {built.returncode}): {_tail(built.stderr)}"
        try:
            loaded = subprocess.run([sys.executable, "-c", _LOADER, str(library)], capture_output=True, text=True,
                                    timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"a shared object it builds hangs when loaded next to torch (> {timeout_s:.0f} s)"
    if loaded.returncode == 0:
        return None
    how = (f"dies with {signal.Signals(-loaded.returncode).name}" if loaded.returncode < 0
           else f"exits {loaded.returncode}")
    return (f"a shared object it builds {how} when loaded next to torch, in std::regex as AOTInductor's "
            f"package loader would (libstdc++ linked statically?): {_tail(loaded.stderr, 3) or 'no output'}")


def _version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _on_path(name: str) -> list[str]:
    """Every `name` on PATH, not only the first: a broken wrapper early on PATH (the H200 machine's
    /opt/gcc/bin/g++) must not hide a working /usr/bin/g++."""
    if os.sep in name:  # a path ($CXX may be one)
        found = shutil.which(name)
        return [found] if found else []
    dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return [found for d in dirs if d and (found := shutil.which(name, path=d))]


def _candidates() -> list[str]:
    """Inductor's default first, then the usual names, each wherever it is on PATH; one entry per
    resolved file."""
    try:
        default = [inductor_default_cxx()]
    except RuntimeError:  # InvalidCxxCompiler: Inductor cannot run $CXX (e.g. "ccache g++"); try the others
        default = []
    seen, out = set(), []
    for name in (*default, *FALLBACKS):
        for path in _on_path(name):
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out


def select_cxx() -> CxxChoice:
    """The compiler for AOTInductor: $DSV3_TORCH_CXX if set (and it must pass), else the first
    candidate whose shared objects load next to torch. Raises RuntimeError naming every failure."""
    forced = os.environ.get(CXX_ENV)
    candidates = [forced] if forced else _candidates()
    if not candidates:
        raise RuntimeError("torch backend: AOTInductor needs a C++ compiler; none of "
                           f"{', '.join(FALLBACKS)} is on PATH (or set {CXX_ENV})")
    rejected: dict[str, str] = {}
    for cxx in candidates:
        reason = check_cxx(cxx)
        if reason is None:
            return CxxChoice(path=cxx, version=_version(cxx), rejected=rejected)
        rejected[cxx] = reason
    listing = "; ".join(f"{c}: {r}" for c, r in rejected.items())
    hint = f"unset {CXX_ENV} or point it at another compiler" if forced else \
        f"install a g++ that links libstdc++ dynamically, or set {CXX_ENV}"
    raise RuntimeError(f"torch backend: no usable C++ compiler for AOTInductor ({listing}); {hint}")
