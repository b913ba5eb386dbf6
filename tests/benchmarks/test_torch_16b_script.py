"""benchmarks/torch_16b.py runs end to end on the CPU (tiny preset), so the one GPU run does not die
on a typo: a 1-layer decode-only engine (the --n-layers profile run; the dense layer alone: the script
has no MoE-specific path, and the 2-layer engine's AOTInductor compile took ~40 s more), its timings,
the floor and the per-op profile all land in the JSON. Its main() runs in this process: no interpreter start and
imports per case (~17 s each on a busy 2-core CI machine); its usage errors come before it changes
anything."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "torch_16b.py"


def _load_script(monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports its neighbours (_floor, _report)
    spec = importlib.util.spec_from_file_location("torch_16b_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~60 s: an AOTInductor build of a 1-layer decode program
def test_cpu_smoke_decode_only_profile_run(tmp_path, monkeypatch, capsys):
    script = _load_script(monkeypatch)
    # On the CPU no build switch acts at lowering (engines/torch.py lower_program: CUDA only), so the
    # --variant build lowers the shared program to the same text as the first build and gets the first
    # build's package instead of a second, identical AOTInductor compile (~45 s on 2 cores). A program
    # whose text differs is compiled.
    compiled: dict[str, Path] = {}
    builds = []

    def compile_package(ep, kind, path, info, promoted=None, inductor=None, real=script.compile_package):
        key = json.dumps([kind, str(ep), info], default=str)  # graph, shapes, signature; what it is built for
        builds.append("reused" if key in compiled else "compiled")
        if key in compiled:
            return Path(shutil.copyfile(compiled[key], path))
        out = real(ep, kind, path, info, promoted, inductor)
        compiled[key] = Path(shutil.copyfile(out, tmp_path / f"package{len(compiled)}.pt2"))
        return out

    monkeypatch.setattr(script, "compile_package", compile_package)
    environ, threads = dict(os.environ), torch.get_num_threads()
    # One thread: Inductor compiles a CPU package's kernels for torch's thread count (2 threads: 40 OpenMP
    # regions per decode step, each waiting for a descheduled thread on a busy 2-core machine: 0.6-0.9 s
    # per step at load 7, against 11 ms on one thread; ~90 steps per build). No check here depends on it.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # the script draws its inputs from the global generator
            code = script.main(["--device", "cpu", "--precisions", "fp8", "--batches", "1,2,3", "--prompt-len", "16",
                                "--decode-steps", "1", "--budget-s", "1e9", "--n-layers", "1",
                                "--engine-kinds", "decode", "--skip", "compile,eager", "--profile-batches", "1,2",
                                "--skip-passes", "fuse_shared_experts",
                                "--variant", "einsums:DSV3_TORCH_ABSORB_GEMM=0,DSV3_TORCH_MOE_ALIGN=aten",
                                "--out", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert code == 0
    assert len(builds) == 2, builds  # the first build's decode program, then the variant's
    data = json.loads((tmp_path / "out" / "torch_16b.json").read_text())
    assert data["meta"]["n_layers_override"] == 1 and data["meta"]["skip_passes"] == ["fuse_shared_experts"]
    fp8 = data["results"]["fp8"]
    engine = fp8["engine"]
    assert "error" not in engine, engine
    assert isinstance(engine["decode_ms_b1"], float) and isinstance(engine["decode_ms_b2"], float), engine
    assert engine["decode_logits_rel_err_vs_eager_step"] < 0.1, engine  # fp8 W8A8 vs the weight-only step
    assert engine["decode_logits_rel_err_vs_eager_step_b3"] < 0.1, engine  # each timed batch above 2 apart
    assert "decode_logits_rel_err_vs_eager_step_b2" not in engine  # batch 2 is the first check's
    assert "generate_tokens" not in engine  # needs the prefill program, not built here
    assert engine["decode_b1_kernels"]["launches_per_step"] > 0, engine["decode_b1_kernels"]
    assert engine["decode_b2_kernels"]["launches_per_step"] > 0, engine["decode_b2_kernels"]  # --profile-batches
    assert "batch-2 decode step" in stdout
    assert "skipped" in engine["decode_b1_graph_timeline"], engine["decode_b1_graph_timeline"]  # needs a GPU
    gen = engine["generate_ms_per_token"]  # one-token prompts: the decode program alone serves generate
    assert gen["b1_queued"] > 0 and gen["b1_one_at_a_time"] > 0, gen
    assert 0 < fp8["floor"]["decode_ms_b1"] <= fp8["floor"]["decode_ms_b2"]  # rounded to 1 us: tiny may tie
    assert "| fp8 | engine |" in stdout
    assert "fuse_shared_experts" not in engine["decode_passes"], engine["decode_passes"]
    # the --variant build: lowered and compiled from the first build's exported program, its switches
    # recorded and restored (the process environment outside the build is unchanged)
    variant = fp8["engine-einsums"]
    assert "error" not in variant, variant
    assert variant["decode_export_s"] == "shared with the first build", variant
    assert variant["build_env"] == {"DSV3_TORCH_ABSORB_GEMM": "0", "DSV3_TORCH_MOE_ALIGN": "aten"}
    assert dict(os.environ) == environ
    assert isinstance(variant["decode_ms_b1"], float), variant
    assert data["meta"]["variants"] == {"einsums": variant["build_env"]}
    assert "| fp8 | engine-einsums |" in stdout and "fp8-einsums: batch-1 decode step" in stdout


@pytest.mark.parametrize("argv, named", [
    (["--variant", "x:FOO=1"], "--variant"),
    (["--variant", "x"], "--variant"),
    (["--variant", "two words:DSV3_TORCH_ROUTER=0"], "--variant"),
    (["--variant", "x:DSV3_TORCH_ROUTER="], "--variant"),
    (["--skip-passes", "fuse_everything"], "fuse_everything"),
    (["--env", "FOO=1"], "--env"),
    (["--tune-decode", "64"], "--tune-decode"),
    (["--profile-batches", "1,x"], "--profile-batches"),
    (["--profile-batches", "0"], "--profile-batches"),
    (["--env", "DSV3_TORCH_ROUTER=0", "--moe-align", "aten", "--variant", "x"], "--variant"),  # valid ones first
])
def test_malformed_option_is_a_usage_error(tmp_path, monkeypatch, capsys, argv, named):
    script = _load_script(monkeypatch)
    environ = dict(os.environ)
    with pytest.raises(SystemExit) as exited:
        script.main(["--device", "cpu", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and named in err, err[-2000:]
    # nothing was changed before the error: the environment, the script's globals, the results file
    assert dict(os.environ) == environ
    assert (script.DEVICE, script.SKIP_PASSES, script.TUNE, script.PROFILE_BATCHES) == ("cuda", set(), {}, [])
    assert not (tmp_path / "torch_16b.json").exists()


def test_kernel_gaps_splits_steps_and_ranks_the_idle_time(monkeypatch):
    """Two steps of three kernels (us): the gaps, the idle total per step and what waited longest."""
    kernel_gaps = _load_script(monkeypatch).kernel_gaps
    step = [("a", 0.0, 10.0), ("b", 11.0, 12.0), ("c", 20.0, 25.0)]  # gaps 1 (before b) and 8 (before c)
    later = [(n, s + 100, e + 100) for n, s, e in [("a", 0.0, 10.0), ("b", 12.0, 13.0), ("c", 13.5, 30.0)]]  # 2, 0.5
    got = kernel_gaps(list(reversed(step + later)), steps=2)  # any order in
    assert got["kernels_per_step"] == 3
    assert got["span_us"] == pytest.approx((25 + 30) / 2, abs=0.051)  # rounded to 0.1 us
    assert got["busy_us"] == pytest.approx((16 + 27.5) / 2, abs=0.051)
    assert got["idle_us"] == pytest.approx((1 + 8 + 2 + 0.5) / 2, abs=0.051)
    assert got["gaps_over_5us_per_step"] == 0.5 and got["idle_us_in_gaps_over_5us"] == 4.0
    assert got["gap_us_max"] == 8.0 and got["longest"][0] == {"us": 8.0, "after": "b", "before": "c"}
    assert [r["next"] for r in got["idle_before"]] == ["c", "b"] and got["idle_before"][0]["us_per_step"] == pytest.approx(4.25, abs=0.051)
    with pytest.raises(ValueError, match="do not split into 2 equal steps"):
        kernel_gaps(step + later[:2], steps=2)


def test_autotune_choices_records_the_winners_and_hands_the_rest_on(monkeypatch, caplog):
    """The winner lines of Inductor's compile-time autotuner (DEBUG) are recorded, not printed; its warnings
    still reach the usual handlers; the logger is as before afterwards."""
    import logging

    script = _load_script(monkeypatch)
    logger = logging.getLogger(script.AUTOTUNE_LOGGER)
    before = (logger.level, logger.propagate)
    with caplog.at_level(logging.WARNING), script.autotune_choices() as found:
        logger.debug("Best config for %s: %s: %f, nreg %d, nspill %d, #shared-mem %s", "_rmsnorm_kernel",
                     "BLOCK_ROWS: 4, num_warps: 8", 0.0109, 40, 0, 512)
        logger.debug("Triton cache dir: %s", "/tmp/x")
        logger.warning("a warning the build should still show")
    assert found == [{"kernel": "_rmsnorm_kernel", "config": "BLOCK_ROWS: 4, num_warps: 8", "ms": 0.0109,
                      "nreg": 40, "nspill": 0, "shared": 512}]
    assert [r.getMessage() for r in caplog.records] == ["a warning the build should still show"]
    assert (logger.level, logger.propagate) == before


def test_graph_replay_row_and_timing_of_the_last_used_graph(monkeypatch):
    """The replay-alone timing replays the graph the step just used (the last entry of its LRU), not another
    batch's; the table gets its row only when the JSON has the numbers (CPU runs have no graphs)."""
    script = _load_script(monkeypatch)
    replays = []

    class FakeGraph:
        def __init__(self, name):
            self.name = name

        def replay(self):
            replays.append(self.name)

    class FakeStep:
        _graphs = type("G", (), {"graphs": {}, "failed": False})()

        def __call__(self, tokens, pos, cache):
            self._graphs.graphs.pop(tokens.shape[0], None)
            self._graphs.graphs[tokens.shape[0]] = {"graph": FakeGraph(f"b{tokens.shape[0]}")}

        def step_writing_cache(self, tokens, pos, cache):  # the timed step's graph: the one with the cache write
            self._graphs.graphs.pop((tokens.shape[0], "write"), None)
            self._graphs.graphs[(tokens.shape[0], "write")] = {"graph": FakeGraph(f"b{tokens.shape[0]} write")}

    monkeypatch.setattr(script, "DEVICE", "cpu")
    model = type("M", (), {"args": type("A", (), {"n_layers": 1, "latent_cache_width": 4, "vocab_size": 9})(),
                           "dtype": torch.float32})()
    step = FakeStep()
    step(torch.zeros(8, 1), None, None)
    assert script.time_graph_replay(step, model, 2, 3, iters=3) >= 0
    assert set(replays) == {"b2 write"} and len(replays) == 3 + 2  # the timed replays and cuda_ms's two warm-ups
    engine = {"decode_ms_b1": 2.0, "decode_ms_b1_no_graph": 3.0}
    data = {"meta": {"prompt_len": 16}, "results": {"fp8": {"engine": engine}}}
    assert "replay alone" not in script.markdown(data, [1])
    engine["decode_ms_b1_replay"] = 1.9
    assert "| fp8 | engine (graph replay alone) |  | 1.90 |" in script.markdown(data, [1])


def test_pdl_timings_gives_the_step_its_own_plan_back_even_when_a_port_fails(monkeypatch):
    """pdl_timings times other plans on the engine's step; the step's own (the runtime's default, DSV3_TORCH_PDL)
    must be back after it, also when a port raises (guarded_dict keeps the run going, and generate and the graph
    timeline then use the step)."""
    from dsv3_export.engines.cuda_graph_pdl import PdlPlan

    script = _load_script(monkeypatch)
    own = PdlPlan("programmatic", frozenset({"_fp8_gemm_kernel"}))

    class Step:
        pdl, pdl_edges, plans = own, None, []

        def set_decode_pdl(self, pdl):
            self.pdl = pdl
            self.plans.append(pdl.port if pdl is not None else "0")

    def step_writing_cache(step, tokens, pos, cache):
        if step.pdl is not None and step.pdl.port == "launch":
            raise RuntimeError("capture failed")
        return torch.zeros(2)

    monkeypatch.setattr(script, "waiting_kernel_names", lambda: frozenset({"_fp8_gemm_kernel"}))
    monkeypatch.setattr(script, "decode_inputs", lambda model, batch, context: (None, None, None))
    monkeypatch.setattr(script, "step_writing_cache", step_writing_cache)
    monkeypatch.setattr(script, "time_step_decode", lambda *args: 1.0)
    step = Step()
    out = script.pdl_timings(step, None, [1], 4, 2, ["programmatic"], ["_fp8_gemm_kernel"])
    assert step.pdl is own and out["pdl_programmatic_logits_identical"] and out["pdl_control_edges"] == "as captured"
    # each plan timed twice, mirrored (a drift along the run hits every plan alike), then the step's own plan back
    assert step.plans == ["0", "programmatic", "0", "0", "programmatic", "programmatic"]
    assert out["decode_ms_b1_pdl_programmatic_runs"] == [1.0, 1.0] and out["decode_ms_b1_pdl_programmatic"] == 1.0
    with pytest.raises(RuntimeError, match="capture failed"):
        script.pdl_timings(step, None, [1], 4, 2, ["launch"], ["_fp8_gemm_kernel"])
    assert step.pdl is own


def test_pdl_port_ours_leaves_inductor_kernels_out(monkeypatch):
    """programmatic-ours times one build's graph with edges into our kernels only: the same-build control of
    DSV3_TORCH_INDUCTOR_PDL (Inductor's kernels in the list)."""
    script = _load_script(monkeypatch)
    monkeypatch.setattr(script, "waiting_kernel_names", lambda: frozenset({"_fp8_gemm_kernel"}))
    waiting = ["_fp8_gemm_kernel", "triton_poi_fused_add_0"]
    assert script.port_plan("programmatic", waiting).waiting == frozenset(waiting)
    ours = script.port_plan("programmatic-ours", waiting)
    assert ours.port == "programmatic" and ours.waiting == frozenset({"_fp8_gemm_kernel"})
    assert script.port_plan("0", waiting) is None
    with pytest.raises(SystemExit):  # a misspelt port fails at the command line, not minutes into a build
        script.main(["--device", "cpu", "--pdl-ports", "programatic-ours"])
