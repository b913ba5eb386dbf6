"""Reproduce the README's diff and profile figures: a tiny engine with a bug injected in layer 2.

    python -m dsv3_export.reports.demo WORK_DIR [--docs docs]

Writes, under WORK_DIR: ckpt_clean/ and ckpt_bug/ (the tiny preset with 4 layers; in ckpt_bug
layers.2.attn.wo.weight gets 2% of its std as noise), engine_bug/ and engine_clean/ (onnxruntime
cpu fp32), diff/ (`dsv3-export diff engine_bug --reference ckpt_clean`, expected to exit 3 and
name layers.2) and profile/ (`dsv3-export profile engine_clean`). With --docs, copies the plots to
DOCS/img/ and the report excerpt to DOCS/report_excerpt.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from dsv3_export.checkpoint import preset_model, save_checkpoint
from dsv3_export.cli import main as cli

BUG_TENSOR = "layers.2.attn.wo.weight"
NOISE = 0.02


def make_checkpoints(work: Path) -> dict[str, Path]:
    out = {}
    for name in ("clean", "bug"):
        model = preset_model("tiny", torch.float32, "cpu", seed=0, n_layers=4)
        if name == "bug":
            w = model.state_dict()[BUG_TENSOR]
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * w.std() * NOISE)
        out[name] = save_checkpoint(model, work / f"ckpt_{name}", overwrite=True)
    return out


def excerpt(report_md: str, profile_md: str, diff_cmd: str, profile_cmd: str) -> str:
    """The README excerpt: the diff verdict and stage table, and the profile table."""
    lines = report_md.splitlines()
    first = next(line for line in lines if line.startswith("**First output"))
    end = next(i for i, line in enumerate(lines) if line.startswith("## Logit"))
    start = next(i for i, line in enumerate(lines) if line.startswith("| output"))
    table = [line for line in lines[start:end] if line.strip()]
    prof = [line for line in profile_md.splitlines() if line.startswith("|")]
    return "\n".join([f"```\n$ {diff_cmd}\n```", "", first, "", *table, "", f"```\n$ {profile_cmd}\n```", "",
                      *prof, ""])


def run(work: Path, docs: Path | None) -> int:
    work.mkdir(parents=True, exist_ok=True)
    ckpts = make_checkpoints(work)
    for name in ("bug", "clean"):
        code = cli(["build", "--checkpoint", str(ckpts[name]), "--out", str(work / f"engine_{name}")])
        if code:
            return code
    diff_args = ["diff", str(work / "engine_bug"), "--reference", str(ckpts["clean"]), "--out", str(work / "diff")]
    code = cli(diff_args)
    if code != 3:
        print(f"expected exit code 3 from diff, got {code}", file=sys.stderr)
        return 1
    prof_args = ["profile", str(work / "engine_clean"), "--batch", "1,4", "--prompt-len", "32,128",
                 "--decode-steps", "32", "--out", str(work / "profile")]
    code = cli(prof_args)
    if code:
        return code
    if docs is not None:
        (docs / "img").mkdir(parents=True, exist_ok=True)
        for png in ("diff_stages.png", "diff_logits.png", "diff_histograms.png"):
            shutil.copy(work / "diff" / png, docs / "img" / png)
        shutil.copy(work / "profile" / "profile.png", docs / "img" / "profile_tiny_cpu.png")
        text = excerpt((work / "diff" / "report.md").read_text(), (work / "profile" / "report.md").read_text(),
                       "dsv3-export diff engine_bug --reference ckpt_clean --out diff   # exit code 3",
                       "dsv3-export profile engine_clean --batch 1,4 --prompt-len 32,128 --decode-steps 32 --out profile")
        (docs / "report_excerpt.md").write_text(text.replace(str(work) + "/", ""))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--docs", type=Path, default=None)
    ns = parser.parse_args()
    sys.exit(run(ns.work, ns.docs))
