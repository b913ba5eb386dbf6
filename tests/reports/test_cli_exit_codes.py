"""Exit codes of diff and profile on bad numbers and empty profiles (README "## CLI": 0 ok, 1 failure,
2 usage error, 3 accuracy gate failed), each error naming its cause. On the tiny ONNX Runtime engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dsv3_export.checkpoint as checkpoint_pkg
from dsv3_export.cli import main
from dsv3_export.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE


@pytest.mark.parametrize("flags, named", [
    (["--atol", "-1"], "--atol -1.0: a tolerance must be a number >= 0"),
    (["--rtol", "nan"], "--rtol nan: a tolerance must be a number >= 0"),
    (["--tol", "logits:atol=-0.5"], "atol=-0.5 must be a number >= 0"),
    (["--tol", "layers.*:min_cosine=nan"], "min_cosine=nan must be a number >= 0"),
    (["--tol", "logits:min_cosine=2"], "min_cosine=2.0 must be at most 1"),  # (was exit 3: 'cosine 1.0 < 2.0')
    (["--gen-steps", "-1"], "--gen-steps -1: must be >= 0"),
])
def test_diff_bad_numbers_are_usage_errors_naming_the_flag(artifacts, tmp_path, capsys, flags, named):
    """A negative / NaN tolerance used to run the whole diff and end in exit 3 (every output over
    it); --gen-steps -1 was refused as 'max_new_tokens must be >= 1', a flag diff does not have."""
    out = tmp_path / "r"
    code = main(["diff", str(artifacts.engines["clean"]), "--out", str(out), "--no-layers", "--seq-len", "8", *flags])
    assert code == EXIT_USAGE
    assert named in " ".join(capsys.readouterr().err.split())
    assert not out.exists()


def test_diff_preset_of_another_model_is_refused_without_drawing_it(artifacts, tmp_path, capsys, monkeypatch):
    """--preset 16b against the tiny engine: drawn in full (62 GB) before the check, OOM-killed on a 24 GB host."""
    def refuse(*args, **kwargs):
        raise AssertionError("the 16b reference was drawn before the model check")

    monkeypatch.setattr(checkpoint_pkg, "preset_model", refuse)
    code = main(["diff", str(artifacts.engines["clean"]), "--out", str(tmp_path / "r"), "--no-layers",
                 "--preset", "16b"])
    assert code == EXIT_USAGE
    assert "the reference is another model than the engine's" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("skipped, measurable, reason", [
    (["--prompt-len", "300"], ["--prompt-len", "6,300"], "prompt 300 + 2 steps > max_seq_len 256"),
    (["--batch", "64", "--prompt-len", "6"], ["--batch", "1,64", "--prompt-len", "6"], "batch 64 > max_batch_size 4"),
])
def test_profile_with_nothing_measured_fails(artifacts, tmp_path, capsys, skipped, measurable, reason):
    """Every configuration skipped used to exit 0 with an empty profile; one measured is still a success."""
    engine, common = str(artifacts.engines["clean"]), ["--decode-steps", "2", "--repeats", "1", "--warmup", "0"]
    code = main(["profile", engine, "--out", str(tmp_path / "none"), *skipped, *common])
    err = " ".join(capsys.readouterr().err.split())
    assert code == EXIT_FAILURE
    assert "every configuration was skipped, nothing was measured" in err and reason in err
    report = json.loads((tmp_path / "none" / "report.json").read_text())  # still written, with the reasons
    assert [r["skipped"] for r in report["engines"][0]["results"]] == [reason]
    assert main(["profile", engine, "--out", str(tmp_path / "some"), *measurable, *common]) == EXIT_OK


def test_diff_takes_a_prompt_that_fills_max_seq_len_with_its_greedy_steps(artifacts, tmp_path, capsys):
    """generate never feeds back the last new token, so a prompt of P tokens and N greedy steps writes P + N - 1
    positions; diff refused P + N == max_seq_len + 1 (e.g. a full-length prompt with one step) as too long."""
    from dsv3_export.reports.diff import DiffOptions, make_prompts

    def options(seq_len: int, gen_steps: int) -> DiffOptions:
        return DiffOptions(engine_dir=tmp_path, out=tmp_path, batch=1, seq_len=seq_len, gen_steps=gen_steps)

    assert len(make_prompts(options(256, 1), 1000, 256)[0]) == 256
    assert len(make_prompts(options(250, 7), 1000, 256)[0]) == 250
    with pytest.raises(ValueError, match="exceed the engine's max_seq_len=256"):
        make_prompts(options(250, 8), 1000, 256)
    out = tmp_path / "r"
    code = main(["diff", str(artifacts.engines["clean"]), "--out", str(out), "--no-layers", "--batch", "1",
                 "--seq-len", "254", "--gen-steps", "3", "--json"])
    assert code == EXIT_OK, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["greedy"]["agreement"] == 1.0 and len(report["greedy"]["engine"][0]) == 3


@pytest.mark.parametrize("command", ["diff", "profile"])
@pytest.mark.parametrize("where", ["under_a_file", "unwritable"])
def test_report_out_that_cannot_be_written_is_refused_first(artifacts, tmp_path, capsys, monkeypatch, command, where):
    """An --out whose parent is a file or not writable: diff ran the whole comparison first, then both commands failed
    with a raw OSError naming a temporary directory ('NotADirectoryError: ... .r.tmp-x7f...'). Now refused before any
    work (exit 1), naming --out."""
    import os

    import dsv3_export.atomic as atomic_module
    import dsv3_export.reports.diff as diff_module
    import dsv3_export.reports.profile as profile_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the engine was loaded before the refusal")

    monkeypatch.setattr(diff_module, "load_engine", no_loading)
    monkeypatch.setattr(profile_module, "load_engine", no_loading)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    out = a_file / "r" if where == "under_a_file" else tmp_path / "ro" / "r"
    if where == "unwritable":  # (the tests run as root, whom file modes do not stop)
        (tmp_path / "ro").mkdir()
        real_access = os.access
        monkeypatch.setattr(atomic_module.os, "access",
                            lambda p, mode: Path(p) != tmp_path / "ro" and real_access(p, mode))
    flags = ["--no-layers"] if command == "diff" else ["--prompt-len", "4", "--decode-steps", "1"]
    code = main([command, str(artifacts.engines["clean"]), "--out", str(out), *flags])
    err = " ".join(capsys.readouterr().err.split())
    assert code == EXIT_FAILURE, err
    assert f"{out}: cannot write there" in err and "Error:" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["afile"] if where == "under_a_file" else ["afile", "ro"])
    assert where == "under_a_file" or list((tmp_path / "ro").iterdir()) == []


def test_profile_checks_every_engine_directory_before_profiling_any(artifacts, tmp_path, capsys, monkeypatch):
    """A --compare directory that is not an engine was found only after every engine before it had been profiled
    (minutes on a large model), and that work thrown away; now refused first, naming the directory."""
    import dsv3_export.reports.profile as profile_module

    def not_yet(*args, **kwargs):
        raise AssertionError("an engine was profiled before every directory was checked")

    monkeypatch.setattr(profile_module, "profile_config", not_yet)
    (tmp_path / "empty").mkdir()
    code = main(["profile", str(artifacts.engines["clean"]), "--out", str(tmp_path / "p"), "--prompt-len", "4",
                 "--decode-steps", "1", "--compare", str(tmp_path / "empty")])
    assert code == EXIT_FAILURE
    assert f"{tmp_path / 'empty' / 'manifest.json'}: missing" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "p").exists()


def test_reference_device_cuda_without_cuda_is_named_before_any_work(artifacts, tmp_path, capsys, monkeypatch):
    """--reference-device cuda on a host without CUDA drew the reference, then failed on moving it with torch's
    'AssertionError: Torch not compiled with CUDA enabled', naming no flag."""
    import torch

    import dsv3_export.reports.diff as diff_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the engine was loaded before the refusal")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(diff_module, "load_engine", no_loading)
    code = main(["diff", str(artifacts.engines["clean"]), "--out", str(tmp_path / "r"), "--no-layers",
                 "--reference-device", "cuda"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == EXIT_FAILURE and "--reference-device cuda: no CUDA device" in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["diff", "profile"])
def test_report_out_inside_an_engine_directory_is_refused(artifacts, tmp_path, capsys, command):
    """`diff engine --out engine/diff` wrote the report and exited 0, leaving an engine that no command loads any more
    ('engine/diff: unexpected directory (not listed in manifest.json)'); profile failed naming its temporary
    directory. Now refused first, and the engine still loads. A manifest.json that is not an engine's is no reason."""
    from dsv3_export.reports.files import check_replaceable
    from dsv3_export.runtime import load_engine
    from tests.engines._ort_engines import copy_engine

    engine = copy_engine(artifacts.engines["clean"], tmp_path / "engine")
    flags = ["--no-layers", "--seq-len", "4"] if command == "diff" else ["--prompt-len", "4", "--decode-steps", "1"]
    code = main([command, str(engine), "--out", str(engine / "report"), *flags])
    err = " ".join(capsys.readouterr().err.split())
    assert code == EXIT_FAILURE and f"{engine / 'report'}: inside the engine directory {engine}" in err, err
    assert sorted(p.name for p in engine.iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data"]
    load_engine(engine)
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "manifest.json").write_text('{"name": "a web app"}')
    check_replaceable(tmp_path / "web" / "report")
