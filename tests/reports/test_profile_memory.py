"""profile's memory column on CUDA, with torch.cuda's memory calls faked (CI has no GPU).

Session 3's 16b report read the device's used memory while torch's allocator still cached the
previous engine's logits: the fp8 engine's rows showed 62-79 GiB for a 21 GiB engine. The meter now
empties torch's cache before each configuration and the report carries the used memory from
before the engine was loaded.
"""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

import torch

from dsv3_export.reports import profile
from dsv3_export.reports.render import _memory_cell

GIB = 2**30


class FakeCuda:
    """The torch.cuda calls the meter makes, over a device with `used` bytes in use."""

    def __init__(self, monkeypatch, used: int, total: int = 80 * GIB):
        self.used, self.total, self.calls = used, total, []
        for name, fn in {"empty_cache": lambda: self.calls.append("empty_cache"),
                         "reset_peak_memory_stats": lambda device=None: self.calls.append("reset_peak"),
                         "mem_get_info": lambda device=None: (self.total - self.used, self.total),
                         "max_memory_allocated": lambda device=None: 3 * GIB,
                         "is_available": lambda: True}.items():
            monkeypatch.setattr(torch.cuda, name, fn)


def test_each_configuration_starts_from_an_emptied_cache_and_keeps_the_baseline(monkeypatch):
    cuda = FakeCuda(monkeypatch, used=30 * GIB)
    meter = profile._MemoryMeter(torch.device("cuda", 0), baseline_bytes=5 * GIB)
    meter.start()
    assert cuda.calls == ["empty_cache", "reset_peak"]
    meter.sample()
    cuda.used = 26 * GIB
    meter.sample()
    memory = meter.result()
    assert (memory.peak_bytes, memory.baseline_bytes, memory.torch_peak_bytes) == (30 * GIB, 5 * GIB, 3 * GIB)
    assert "25600.0 MiB above the load baseline" in _memory_cell(asdict(memory))


def test_baseline_is_taken_after_releasing_torch_cache_for_cuda_engines_only(monkeypatch, tmp_path):
    cuda = FakeCuda(monkeypatch, used=7 * GIB)
    device = {"kind": "cuda"}
    monkeypatch.setattr("dsv3_export.manifest.verify_engine_dir",
                        lambda path, check_hashes=True: SimpleNamespace(device=device["kind"]))
    assert profile.device_used_before_load(tmp_path) == 7 * GIB
    assert cuda.calls == ["empty_cache"]
    device["kind"] = "cpu"
    assert profile.device_used_before_load(tmp_path) is None


def test_cpu_rows_have_no_baseline():
    memory = profile._MemoryMeter(torch.device("cpu")).result()
    assert memory.baseline_bytes is None and "baseline" not in _memory_cell(asdict(memory))
