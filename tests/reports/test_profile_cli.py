"""`dsv3-export profile` on the tiny CPU engine: report.json against its schema, Markdown, plot, trace."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsv3_export.cli import main
from dsv3_export.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from dsv3_export.reports.profile import ProfileReport
from dsv3_export.reports.schema import SchemaError, from_dict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS, REPEATS = 4, 2


@pytest.fixture(scope="module")
def profiled(artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "prof"
    engine = str(artifacts.engines["clean"])
    argv = ["profile", engine, "--out", str(out), "--batch", "1,2,8", "--prompt-len", "8,20",
            "--decode-steps", str(STEPS), "--repeats", str(REPEATS), "--warmup", "1", "--trace", "--compare", engine]
    return main(argv), out


def test_profile_writes_schema_checked_json(profiled):
    code, out = profiled
    assert code == EXIT_OK
    raw = json.loads((out / "report.json").read_text())
    report = from_dict(ProfileReport, raw)  # every key and type, recursively; unknown keys refused
    assert report.schema == "dsv3-export/profile/2"
    assert [e.label for e in report.engines] == ["engine_clean#0", "engine_clean#1"]
    e = report.engines[0]
    assert (e.backend, e.device, e.precision, e.cuda_graphs) == ("onnxruntime", "cpu", "fp32", False)
    assert [(r.batch, r.prompt_len) for r in e.results] == [(b, p) for b in (1, 2, 8) for p in (8, 20)]
    for r in e.results:
        if r.batch == 8:  # the tiny engine's max_batch_size is 4
            assert r.skipped and "max_batch_size" in r.skipped and r.tpot_ms is None
            continue
        assert r.skipped is None
        assert r.ttft_ms.n == REPEATS == len(r.ttft_ms.samples)
        t = r.tpot_ms
        assert t.n == STEPS * REPEATS == len(t.samples)
        assert min(t.samples) == t.min <= t.median <= t.p90 <= t.p99 <= max(t.samples)
        assert t.mean == pytest.approx(np.mean(t.samples))
        assert r.decode_tokens_per_s == pytest.approx(r.batch * 1e3 / t.mean)
        assert r.prefill_tokens_per_s == pytest.approx(r.batch * r.prompt_len * 1e3 / r.ttft_ms.median)
        assert r.memory.kind == "cpu peak rss" and r.memory.peak_bytes > 10 * 2**20


def test_profile_markdown_plot_and_trace(profiled):
    _, out = profiled
    md = (out / "report.md").read_text()
    assert "| engine_clean#0 | 1 | 8 |" in md and "skipped: batch 8 > max_batch_size 4" in md
    assert "CUDA graphs: False" in md and "![profile.png](profile.png)" in md
    data = (out / "profile.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    report = from_dict(ProfileReport, json.loads((out / "report.json").read_text()))
    trace = report.engines[0].trace
    assert trace.kind == "onnxruntime profiling" and trace.config == [1, 8]
    events = json.loads((out / trace.file).read_text())
    assert any(ev.get("cat") == "Node" for ev in events)
    ops = {o.op for o in trace.ops}
    assert "MatMul" in ops and abs(sum(o.share for o in trace.ops) - 1.0) < 0.05


def test_schema_rejects_malformed_reports(profiled):
    _, out = profiled
    raw = json.loads((out / "report.json").read_text())
    broken = json.loads(json.dumps(raw))
    del broken["engines"][0]["results"][0]["tpot_ms"]["p99"]
    with pytest.raises(SchemaError, match=r"engines\[0\]\.results\[0\]\.tpot_ms.*p99"):
        from_dict(ProfileReport, broken)
    broken = json.loads(json.dumps(raw))
    broken["engines"][1]["results"][1]["batch"] = "1"
    with pytest.raises(SchemaError, match="batch"):
        from_dict(ProfileReport, broken)
    broken = json.loads(json.dumps(raw))
    broken["settings"]["surprise"] = 1
    with pytest.raises(SchemaError, match="unknown keys"):
        from_dict(ProfileReport, broken)


def test_profile_stdout_and_progress(artifacts, tmp_path, capsys):
    """Without a terminal: no progress on stderr; --json: one JSON document on stdout and nothing else."""
    code = main(["profile", str(artifacts.engines["clean"]), "--out", str(tmp_path / "p"), "--prompt-len", "6",
                 "--decode-steps", "2", "--repeats", "1", "--json"])
    captured = capsys.readouterr()
    assert code == EXIT_OK
    summary = json.loads(captured.out)
    assert summary["engines"][0]["results"][0]["tpot_ms_median"] > 0
    assert "profiling" not in captured.err and "wrote" in captured.err


def test_failing_configuration_is_recorded_and_fails_the_command(artifacts, tmp_path, monkeypatch, capsys):
    """A configuration whose runs raise (an out-of-memory, a provider error) is written into the
    report with its error; the configurations around it keep their numbers; exit code 1."""
    import dsv3_export.reports.profile as profile_module

    real = profile_module.timed_run

    def failing_at_batch_2(engine, tokens, decode_steps, step=None):
        if tokens.shape[0] == 2:
            raise RuntimeError("injected\nprovider failure")
        return real(engine, tokens, decode_steps, step)

    monkeypatch.setattr(profile_module, "timed_run", failing_at_batch_2)
    out = tmp_path / "p"
    code = main(["profile", str(artifacts.engines["clean"]), "--out", str(out), "--batch", "1,2,3",
                 "--prompt-len", "6", "--decode-steps", "2", "--repeats", "1"])
    assert code == EXIT_FAILURE
    assert "1 configuration(s) failed" in capsys.readouterr().err
    report = from_dict(ProfileReport, json.loads((out / "report.json").read_text()))
    by_batch = {r.batch: r for r in report.engines[0].results}
    assert by_batch[2].skipped == "failed: RuntimeError: injected provider failure" and by_batch[2].tpot_ms is None
    assert by_batch[1].skipped is None and by_batch[3].skipped is None and by_batch[3].tpot_ms.n == 2
    assert "failed: RuntimeError" in (out / "report.md").read_text()


@pytest.mark.parametrize("flags", [["--batch", "0"], ["--batch", "1,x"], ["--prompt-len", ""], ["--decode-steps", "0"]])
def test_profile_usage_errors(artifacts, tmp_path, flags):
    assert main(["profile", str(artifacts.engines["clean"]), "--out", str(tmp_path / "p"), *flags]) == EXIT_USAGE
    assert not (tmp_path / "p").exists()


def test_repeated_sizes_are_profiled_once():
    """--batch 1,1 (or a repeated --prompt-len) timed the same configuration twice; each size now runs once, in the
    order given."""
    from dsv3_export.commands.profile import int_list

    assert int_list("--batch", "8,1,8,1,64") == (8, 1, 64)
    assert int_list("--prompt-len", " 128 , 128") == (128,)
