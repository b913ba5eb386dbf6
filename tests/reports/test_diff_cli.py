"""`dsv3-export diff` end to end on tiny ONNX Runtime engines: localization, negative controls, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv3_export.cli import main
from dsv3_export.errors import EXIT_ACCURACY, EXIT_OK, EXIT_USAGE
from tests.reports.conftest import N_LAYERS

STAGES = ["embed", *(f"layers.{i}" for i in range(N_LAYERS)), "norm", "logits"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _diff(artifacts, engine: str, out: Path, *extra: str) -> tuple[int, dict]:
    argv = ["diff", str(artifacts.engines[engine]), "--out", str(out),
            "--debug-engine", str(artifacts.debug_engine(engine)), "--seq-len", "24", "--gen-steps", "8", *extra]
    code = main(argv)
    report = json.loads((out / "report.json").read_text(), parse_constant=_reject) if (out / "report.json").exists() else {}
    return code, report


def _reject(name: str):
    raise AssertionError(f"report.json holds the non-standard JSON constant {name}")


def _passed(report: dict) -> dict[str, bool]:
    return {o["name"]: o["passed"] for o in report["outputs"]}


def test_injected_layer2_bug_is_named_first(artifacts, tmp_path):
    """Engine built from a checkpoint whose layers.2 weight is perturbed, against the clean reference."""
    code, report = _diff(artifacts, "bug_layer2", tmp_path / "r", "--reference", str(artifacts.checkpoints["clean"]))
    assert code == EXIT_ACCURACY
    assert [o["name"] for o in report["outputs"]] == STAGES
    assert report["verdict"]["first_failing"] == "layers.2"
    passed = _passed(report)
    assert passed["embed"] and passed["layers.0"] and passed["layers.1"]
    assert not any(passed[n] for n in STAGES[STAGES.index("layers.2"):])  # the error propagates downstream
    assert report["debug_engine"]["reproduces_engine"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "First output over tolerance: `layers.2`" in md and "FAILED (exit code 3)" in md
    for png in ("diff_stages.png", "diff_logits.png", "diff_histograms.png"):
        data = (tmp_path / "r" / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png


def test_engine_equal_to_reference_passes(artifacts, tmp_path):
    code, report = _diff(artifacts, "clean", tmp_path / "r")  # reference: the engine's own source checkpoint
    assert code == EXIT_OK
    v = report["verdict"]
    assert v["passed"] and v["first_failing"] is None and all(_passed(report).values())
    assert report["reference"]["checkpoint"] == str(artifacts.checkpoints["clean"].absolute())
    assert report["logits"]["top1_agreement"]["value"] == 1.0
    assert report["greedy"]["agreement"] == 1.0
    assert report["logits"]["kl_mean"]["value"] < 1e-9
    p = report["provenance"]
    assert p["versions"]["torch"] == torch.__version__ and report["engine"]["hash"]
    assert p["seeds"] == {"prompts": 0, "bootstrap": 0, "reference_weights": None}  # a checkpoint has no seed
    assert report["inputs"]["seed"] == 0 and report["inputs"]["positions"] == 2 * 24


def test_perturbed_reference_fails_at_its_layer(artifacts, tmp_path):
    """Negative control: a correct engine against a reference with a wrong layers.1 weight."""
    code, report = _diff(artifacts, "clean", tmp_path / "r", "--reference", str(artifacts.checkpoints["bug_layer1"]))
    assert code == EXIT_ACCURACY
    assert report["verdict"]["first_failing"] == "layers.1"
    assert _passed(report)["layers.0"] and not _passed(report)["layers.1"]


def test_per_output_tolerance_moves_the_first_failure(artifacts, tmp_path):
    """--tol loosens layers.2 only: the next stage (layers.3, still off) becomes the first failure."""
    code, report = _diff(artifacts, "bug_layer2", tmp_path / "r", "--reference", str(artifacts.checkpoints["clean"]),
                         "--tol", "layers.2:atol=10,rtol=10,min_cosine=0")
    assert code == EXIT_ACCURACY
    assert _passed(report)["layers.2"]
    assert report["verdict"]["first_failing"] == "layers.3"
    assert report["tolerances"]["overrides"] == [{"pattern": "layers.2", "atol": 10.0, "min_cosine": 0.0, "rtol": 10.0}]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_engine_output_fails(artifacts, tmp_path, monkeypatch, bad):
    """An engine whose logits hold one NaN / Inf fails even with tolerances that accept anything finite."""
    from dsv3_export.runtime import Engine

    forward = Engine.forward

    def poisoned(self, tokens):
        logits = forward(self, tokens)
        logits[0, 3, 7] = bad
        return logits

    monkeypatch.setattr(Engine, "forward", poisoned)
    code, report = _diff(artifacts, "clean", tmp_path / "r", "--no-layers", "--gen-steps", "0",
                         "--atol", "1e9", "--rtol", "1e9")
    assert code == EXIT_ACCURACY
    logits = report["outputs"][-1]
    assert [o["name"] for o in report["outputs"]] == ["logits"]
    assert logits["nonfinite"] == 1 and "NaN/Inf" in logits["failures"][0]
    assert logits["max_abs_at"] == {"prompt": 0, "position": 3, "feature": 7}
    assert report["verdict"]["first_failing"] == "logits"


def test_prompt_ids_and_usage_errors(artifacts, tmp_path):
    code, report = _diff(artifacts, "clean", tmp_path / "r", "--no-layers", "--prompt-ids", "1,2,3;4,5,6,7,8")
    assert code == EXIT_OK and report["inputs"]["lengths"] == [3, 5] and report["inputs"]["positions"] == 8
    assert main(["diff", str(artifacts.engines["clean"]), "--out", str(tmp_path / "x"), "--tol", "logits"]) == EXIT_USAGE
    assert main(["diff", str(artifacts.engines["clean"]), "--out", str(tmp_path / "x"), "--no-layers",
                 "--prompt-ids", "1,99999"]) == EXIT_USAGE
    assert main(["diff", str(artifacts.engines["clean"]), "--out", str(tmp_path / "x"), "--no-layers",
                 "--preset", "tiny"]) == EXIT_USAGE  # 3-layer preset vs the 4-layer engine: another model
    assert not (tmp_path / "x").exists()


def test_out_that_is_not_a_report_dir_is_refused_before_running(artifacts, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["diff", str(artifacts.engines["clean"]), "--out", str(out), "--no-layers"]) == 1
    assert "not a report directory" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_debug_engine_path_never_replaces_an_engine(artifacts, tmp_path, capsys):
    """--debug-engine naming the engine itself (or another, non-debug engine) rebuilt a debug engine over it and exited
    0: the user's engine was gone. Now refused before any work, the directory left as it was; inside --out: a usage
    error (the report's atomic replace would delete the kept debug engine)."""
    import hashlib

    from tests.engines._ort_engines import copy_engine

    engine = copy_engine(artifacts.engines["clean"], tmp_path / "engine")
    other = copy_engine(artifacts.engines["bug_layer2"], tmp_path / "other")

    def digest(d: Path) -> str:
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(d.iterdir()))).hexdigest()

    before = {d: digest(d) for d in (engine, other)}
    for target in (engine, other):
        code = main(["diff", str(engine), "--out", str(tmp_path / "r"), "--debug-engine", str(target),
                     "--seq-len", "4", "--gen-steps", "0"])
        assert code == 1, target
        assert "not a debug engine; refusing to replace it" in " ".join(capsys.readouterr().err.split())
    assert {d: digest(d) for d in (engine, other)} == before
    # a directory build would refuse: was refused by build only after the reference model was loaded
    import dsv3_export.reports.diff as diff_module

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference was loaded before the --debug-engine refusal")

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("x")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diff_module, "load_reference", no_reference)
        for target, why in ((tmp_path / "notes", "exists and is not an engine directory"),
                            (engine / "debug", "inside the engine directory")):
            code = main(["diff", str(engine), "--out", str(tmp_path / "r"), "--debug-engine", str(target),
                         "--seq-len", "4", "--gen-steps", "0"])
            assert code == 1, target
            assert why in " ".join(capsys.readouterr().err.split()), target
    assert (tmp_path / "notes" / "keep.txt").read_text() == "x" and digest(engine) == before[engine]
    out = tmp_path / "r"
    for target in (out, out / "debug"):
        code = main(["diff", str(engine), "--out", str(out), "--debug-engine", str(target), "--seq-len", "4"])
        assert code == EXIT_USAGE, target
        assert "--debug-engine" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("fail_in", ["build", "load"])
def test_temporary_debug_engine_is_removed_when_diff_fails(artifacts, tmp_path, monkeypatch, fail_in):
    """Without --debug-engine the debug engine is built in a temporary directory; it was removed only around the runs,
    so a failure or Ctrl-C while building or loading it left the directory (a whole engine: GBs for a large model)."""
    import tempfile

    import dsv3_export.reports.diff as diff_module
    from dsv3_export.reports.debug_engine import DebugEngineError

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def fake_build(engine, path, console=None):
        path.mkdir()
        (path / "model.onnx.data").write_bytes(b"x" * 1000)
        if fail_in == "build":
            raise KeyboardInterrupt
        return path

    def failing_load(path):
        raise DebugEngineError(f"{path}: cannot load it")

    monkeypatch.setattr(diff_module, "ensure_debug_engine", fake_build)
    monkeypatch.setattr(diff_module.DebugRunner, "load", staticmethod(failing_load))
    code = main(["diff", str(artifacts.engines["clean"]), "--out", str(tmp_path / "r"), "--seq-len", "4"])
    assert code == (130 if fail_in == "build" else 1)
    assert list(scratch.iterdir()) == [] and not (tmp_path / "r").exists()
