"""engines/torch.py inductor_configs: what the AOTInductor compile of a program is asked for."""

from __future__ import annotations

import pytest

from dsv3_export.engines.torch import COMBO_KERNELS_ENV, inductor_configs

CUDA = {"device_kind": "cuda"}
CPU = {"device_kind": "cpu", "march": None}


def test_combo_kernels_off_by_default(monkeypatch):
    monkeypatch.delenv(COMBO_KERNELS_ENV, raising=False)
    assert "combo_kernels" not in inductor_configs("decode", CUDA)


def test_combo_kernels_opt_in_for_cuda_packages_only(monkeypatch):
    monkeypatch.setenv(COMBO_KERNELS_ENV, "1")
    assert inductor_configs("decode", CUDA)["combo_kernels"] is True
    assert "combo_kernels" not in inductor_configs("decode", CPU)  # Inductor's C++ kernels have no combo form


def test_combo_kernels_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(COMBO_KERNELS_ENV, "yes")
    with pytest.raises(ValueError, match=COMBO_KERNELS_ENV):
        inductor_configs("decode", CUDA)


def test_package_metadata_names_program_and_device_kind(monkeypatch):
    monkeypatch.delenv(COMBO_KERNELS_ENV, raising=False)
    meta = inductor_configs("prefill", CUDA)["aot_inductor.metadata"]
    assert meta == {"dsv3_program": "prefill", "dsv3_device_kind": "cuda"}


def test_cuda_packages_tune_their_kernels_without_the_autotune_cache(monkeypatch):
    # Inductor's local autotune cache keys a kernel by its source, not the sizes it was timed at: a package
    # would take the configs another build timed at other export sizes (dsv3_export.export.TuneShape).
    monkeypatch.delenv(COMBO_KERNELS_ENV, raising=False)
    assert inductor_configs("decode", CUDA)["autotune_local_cache"] is False
    assert "autotune_local_cache" not in inductor_configs("decode", CPU)  # nothing is autotuned on the CPU


def test_every_config_key_is_one_inductor_knows(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setenv(COMBO_KERNELS_ENV, "1")
    for info in (CUDA, CPU):
        for key in inductor_configs("decode", info):
            module, _, name = key.rpartition(".")
            owner = inductor_config
            for part in filter(None, module.split(".")):
                owner = getattr(owner, part)
            assert hasattr(owner, name), key
