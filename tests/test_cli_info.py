"""`dsv3-export info` and the CLI's error/exit-code contract."""

from __future__ import annotations

import json

from dsv3_export.checkpoint import preset_model, save_checkpoint
from dsv3_export.cli import main


def test_info_16b_reports_parameters_and_cache_sizes(capsys):
    assert main(["info", "--preset", "16b", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert abs(stats["total_params"] - 15.7e9) / 15.7e9 < 0.005
    assert abs(stats["active_params_per_token"] - 2.45e9) / 2.45e9 < 0.01  # DESIGN.md: ~2.45 B
    assert stats["kv_values_per_token_absorbed"] == 27 * 576
    assert stats["kv_values_per_token_naive"] == 27 * 5120
    assert stats["weight_bytes_fp8"] < 0.55 * stats["weight_bytes_bf16"]


def test_info_reads_a_checkpoint_config_only(tmp_path, capsys):
    save_checkpoint(preset_model("tiny"), tmp_path / "ckpt", layout="hf")
    assert main(["info", "--checkpoint", str(tmp_path / "ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["dim"] == 192


def test_bad_input_exits_nonzero_with_the_problem_named(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"dim": 64, "hidden_sise": 1}))
    assert main(["info", "--config", str(bad)]) == 1
    assert "hidden_sise" in capsys.readouterr().err
    assert main(["info", "--checkpoint", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "CheckpointError" not in err  # the message alone, as every other command's
    assert main(["info", "--preset", "huge"]) == 1
    assert capsys.readouterr().err.strip() == "error: unknown preset 'huge'; presets: tiny, 16b, 671b"
    assert main(["info", "--no-such-flag"]) == 2
    assert main(["info", "--preset", "tiny", "--config", str(bad)]) == 2
