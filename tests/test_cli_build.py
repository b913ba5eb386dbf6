"""`dsv3-export build / generate / inspect` through the CLI entry point (dsv3_export.cli.main).

The no-argument build (tiny preset -> onnxruntime cpu fp32 -> ./engine) is the README's main job;
it runs once in a scratch directory (tests/engines/_ort_engines.py) and is shared by the tests.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dsv3_export.cli import main
from dsv3_export.runtime import load_engine
from tests.engines._ort_engines import default_cli_engine, fp32_engine_dir


def test_build_without_arguments_writes_engine_and_reports():
    build = default_cli_engine()
    assert build.exit_code == 0, build.stderr[-3000:]
    assert build.path.name == "engine"
    assert sorted(p.name for p in build.path.iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data"]
    for what in ("fuse_mla_absorb=3", "dsv3::mla_attention", "model.onnx.data", "total"):
        assert what in build.stderr
    assert build.stdout == ""  # progress and summary go to stderr


def test_generate_json_prints_only_json(capsys):
    engine_dir = fp32_engine_dir()
    code = main(["generate", str(engine_dir), "--prompt-ids", "5,17,256", "--max-new-tokens", "6", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert result["new_ids"] == [load_engine(engine_dir).generate([5, 17, 256], max_new_tokens=6)]
    assert result["backend"] == "onnxruntime" and result["prompts"] == [[5, 17, 256]]


def test_generate_batch_and_sampling_flags(capsys):
    code = main(["generate", str(fp32_engine_dir()), "--prompt-ids", "1,2,3;4,5", "--max-new-tokens", "3",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].startswith("1,2,3 -> ") and lines[1].startswith("4,5 -> ")


def test_inspect_shows_io_ops_and_files(capsys):
    code = main(["inspect", str(fp32_engine_dir())])
    out = capsys.readouterr().out
    assert code == 0
    for what in ("kv_cache", "cache_len", "MatMul", "model.onnx.data", "sha256", "fuse_mla_absorb"):
        assert what in out
    assert main(["inspect", str(fp32_engine_dir()), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "onnxruntime"


def test_tensorrt_is_refused_clearly(capsys, tmp_path):
    code = main(["build", "--backend", "tensorrt", "--out", str(tmp_path / "e")])
    assert code == 1
    assert "not available: TensorRT builder is not installable here" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("argv", [["--precision", "fp16"], ["--device", "tpu"], ["--backend", "tvm"],
                                  ["--preset", "tiny", "--checkpoint", "x"], ["--tune-decode", "64"],
                                  ["--tune-prefill", "2,x"]])
def test_bad_build_flags_are_usage_errors(capsys, tmp_path, argv):
    assert main(["build", "--out", str(tmp_path / "e"), *argv]) == 2
    assert "error" in capsys.readouterr().err


def test_tune_sizes_outside_the_models_limits_are_refused_before_export(capsys, tmp_path):
    # tiny: max_batch_size 4, max_seq_len 256
    assert main(["build", "--out", str(tmp_path / "e"), "--tune-decode", "8,1024"]) == 1
    err = capsys.readouterr().err
    assert "decode tune shape (8, 1, 1024)" in err and "max_batch_size=4" in err and "max_seq_len=256" in err
    assert "export" not in err.split("decode tune shape")[0]  # refused before the export phase
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("argv", [["--passes", "bogus_pass"], ["--passes", "fuse_mla_absorb,nope"]])
def test_unknown_passes_are_usage_errors(capsys, tmp_path, argv):
    assert main(["build", "--out", str(tmp_path / "e"), *argv]) == 2
    assert "unknown pass(es)" in capsys.readouterr().err


def test_refusals_come_before_the_model_is_loaded(capsys, tmp_path, monkeypatch):
    """A bad --out, fp8 without its pass, a zero tune size and max_batch_size 1 are refused from the options and the
    config alone: no weights drawn (on a large model those take minutes), no OUT.graphs left behind."""
    import dsv3_export.build as build_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(build_module, "_load_model", no_loading)
    from dsv3_export.manifest import write_engine_dir
    from tests.test_manifest import fill_payload

    a_file, full, engine = tmp_path / "afile", tmp_path / "full", tmp_path / "engine"
    a_file.write_text("x")
    full.mkdir()
    (full / "keep.txt").write_text("x")
    write_engine_dir(engine, fill_payload)
    cases = [(["--out", str(a_file)], "exists and is not an engine directory"),
             # was built and exited 0, leaving an engine that no command loads ('unexpected directory')
             (["--out", str(engine / "inner")], f"inside the engine directory {engine}"),
             (["--out", str(full), "--dump-graphs"], "exists and is not an engine directory"),
             (["--out", str(tmp_path / "e"), "--precision", "fp8", "--passes", "none"], "needs the quantize_fp8"),
             (["--out", str(tmp_path / "e"), "--tune-decode", "0,0", "--backend", "torch"], "batch 0 is not in"),
             (["--out", str(tmp_path / "e"), "--max-batch-size", "1"], "set --max-batch-size 2 or more")]
    for argv, message in cases:
        assert main(["build", *argv]) == 1, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "full.graphs").exists() and not (tmp_path / "e").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "engine", "full"]  # no temporary directory either
    assert sorted(p.name for p in engine.iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data"]


def test_sigterm_unwinds_and_leaves_nothing_half_written(tmp_path):
    """SIGTERM mid-build (timeout, docker stop) exits 143 with a message and removes the half-filled temporary
    directory, as Ctrl-C does (130); Python's default action exits at once and leaves it. In a subprocess: the
    signal is sent while the backend's files are in the temporary directory (the manifest not yet written)."""
    import subprocess
    import sys

    script = (
        "import os, signal, sys\n"
        "import dsv3_export.build as b\n"
        "real = b.kv_cache_layout\n"
        "def signalled(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*args, **kwargs)\n"
        "b.kv_cache_layout = signalled\n"
        "from dsv3_export.cli import main\n"
        f"sys.exit(main(['build', '--out', {str(tmp_path / 'e')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "terminated (SIGTERM)" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_manifest_records_the_export_shapes():
    manifest = json.loads((fp32_engine_dir() / "manifest.json").read_text())
    # onnxruntime builds one program (prefill serves decode too); tiny: max_seq_len 256
    assert manifest["backend_info"]["export_shapes"] == {"prefill": {"batch": 2, "seqlen": 128, "cache_len": 5}}


def test_generate_refuses_a_tampered_engine_naming_the_file(capsys, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(fp32_engine_dir(), engine)
    (engine / "extra.bin").write_bytes(b"0")
    assert main(["generate", str(engine), "--prompt-ids", "1,2"]) == 1
    assert "extra.bin: unexpected file" in capsys.readouterr().err
    assert main(["generate", str(fp32_engine_dir()), "--prompt-ids", "1,x"]) == 2


def test_hf_checkpoint_builds_and_generates_through_the_cli(capsys, tmp_path):
    """A tiny transformers DeepseekV2 checkpoint (save_pretrained) -> build -> generate, CLI only;
    the tokens equal greedy decoding of the checkpoint loaded into the reference model."""
    transformers = pytest.importorskip("transformers")
    from dsv3_export.checkpoint import load_checkpoint
    from tests.conftest import reference_greedy

    config = transformers.DeepseekV2Config(
        vocab_size=211, hidden_size=64, intermediate_size=96, moe_intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        q_lora_rank=None, max_position_embeddings=128, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.DeepseekV2ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # unit-gain weights: HF's N(0, 0.02) init makes routing scores near-ties
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5 if p.dim() >= 2 else 1 + 0.1 * torch.randn(p.shape, generator=gen))
    ckpt, out = tmp_path / "ckpt", tmp_path / "engine"
    hf.save_pretrained(ckpt)
    assert main(["build", "--checkpoint", str(ckpt), "--out", str(out)]) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt-ids", "3,1,4,1,5,9,2,6", "--max-new-tokens", "12", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = reference_greedy(load_checkpoint(ckpt), [3, 1, 4, 1, 5, 9, 2, 6], 12)
    assert result["new_ids"] == [expected]
    assert load_engine(out).manifest.source["checkpoint"] == str(ckpt.absolute())


def test_selected_passes_dump_graphs_and_verify_each_pass(capsys, tmp_path):
    out = tmp_path / "engine"
    code = main(["build", "--out", str(out), "--passes", "fuse_mla_absorb", "--dump-graphs", "--verify-each-pass"])
    assert code == 0, capsys.readouterr().err[-3000:]
    engine = load_engine(out)
    assert [p["name"] for p in engine.manifest.passes] == ["fuse_mla_absorb"]
    assert set(engine.manifest.lowerings) == {"dsv3::mla_attention"}  # the MoE stays as exported
    dumps = tmp_path / "engine.graphs" / "prefill"
    assert dumps.is_dir() and any(dumps.iterdir())
    tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(3))
    from tests.engines._ort_engines import tiny_model

    with torch.no_grad():
        expected = tiny_model()(tokens)
    assert ((engine.forward(tokens) - expected).norm() / expected.norm()).item() < 1e-4
