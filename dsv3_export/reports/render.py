"""Markdown renderings of diff and profile reports (report.md), from the report dicts alone."""

from __future__ import annotations

from typing import Any


def _g(x: Any, digits: int = 3) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def _at(loc: dict[str, int]) -> str:
    return f"p{loc['prompt']} t{loc['position']} f{loc['feature']}"


def _ci(d: dict[str, Any], digits: int = 3) -> tuple[str, str]:
    return _g(d["value"], digits), f"[{_g(d['ci95'][0], digits)}, {_g(d['ci95'][1], digits)}]"


def render_diff(report: dict[str, Any], images: list[str]) -> str:
    v, e, ref, inp = report["verdict"], report["engine"], report["reference"], report["inputs"]
    src = ", ".join(f"{k} {val}" for k, val in e["source"].items())
    ref_src = ", ".join(f"{k} {val}" for k, val in ref.items())
    status = "PASSED" if v["passed"] else "FAILED (exit code 3)"
    lines = [f"# dsv3-export diff: {status}", "",
             f"- engine: `{e['path']}` ({e['backend']} {e['device']}/{e['precision']}; source: {src}; "
             f"sha256 of manifest `{e['hash'][:16]}`)",
             f"- reference: {ref_src}",
             f"- inputs: {inp['prompts']} prompt(s) of length {', '.join(map(str, inp['lengths']))} "
             f"({inp['positions']} positions), seed {inp['seed']}{' (given ids)' if inp['given'] else ''}", ""]
    if not v["passed"]:
        first = v["first_failing"]
        lines += [f"**First output over tolerance: `{first}`** (every output before it is within tolerance).", ""]
    tol = report["tolerances"]
    lines += [f"Tolerances: table entry {'/'.join(tol['table_key'])}: atol {_g(tol['base']['atol'])}, "
              f"rtol {_g(tol['base']['rtol'])}, outliers <= {_g(tol['base']['max_outlier_frac'])}, "
              f"cosine >= {tol['base']['min_cosine']}"
              + (f" and >= 1 - {_g(tol['base']['cos_dist_per_stage'])} x depth" if tol['base']['cos_dist_per_stage'] else "")
              + (f"; overrides {', '.join(o['pattern'] for o in tol['overrides'])}" if tol["overrides"] else ""), ""]
    lines += ["## Outputs", "",
              "| output | max abs err (at) | mean abs err | max rel err (at) | cosine (floor) | SQNR dB | outliers | |",
              "|---|---|---|---|---|---|---|---|"]
    for o in report["outputs"]:
        mark = "ok" if o["passed"] else "**FAIL**"
        lines.append(f"| {o['name']} | {_g(o['max_abs'])} ({_at(o['max_abs_at'])}) | {_g(o['mean_abs'])} | "
                     f"{_g(o['max_rel'])} ({_at(o['max_rel_at'])}) | "
                     f"{_g(o['cosine'], 7)} ({_g(o['tolerance']['min_cosine'], 6)}) | "
                     f"{_g(o['sqnr_db'], 4)} | "
                     f"{_g(o['outlier_frac'])} | {mark} |")
    lg = report["logits"]
    gates = lg["gates"]
    lines += ["", "## Logit distributions", "", "| metric | value | 95% CI (bootstrap) | gate |", "|---|---|---|---|"]
    p99_gate = f"<= {_g(gates['max_kl_p99'])}" if gates["max_kl_p99"] is not None else "-"
    for label, key, gate in (("mean KL(p_ref ‖ p_engine), nats", "kl_mean", f"<= {_g(gates['max_kl_mean'])}"),
                             ("p99 KL, nats", "kl_p99", p99_gate),
                             ("top-1 agreement", "top1_agreement", f">= {gates['min_top1']}"),
                             ("RMS dp (reference top-1 token)", "delta_p_rms", "-")):
        value, ci = _ci(lg[key], 4)
        lines.append(f"| {label} | {value} | {ci} | {gate} |")
    g = report.get("greedy")
    if g:
        gate = f" (gate >= {g['min_agreement']})" if g["min_agreement"] is not None else " (not gated)"
        div = [d for d in g["first_divergence"] if d is not None]
        lines += ["", f"Greedy generation, {g['steps']} steps: {g['agreement']:.3f} of tokens generated before the "
                      f"first divergence{gate}; position-wise equal {g['positionwise']:.3f}; "
                      + (f"first divergence at step(s) {div}." if div else "no divergence.")]
    d = report.get("debug_engine")
    if d:
        lines += ["", f"Per-stage outputs come from a debug build of the same source, backend, precision and passes "
                      f"(output `{d['hidden_output']}`); its logits "
                      + ("reproduce" if d["reproduces_engine"] else "**do not reproduce**")
                      + f" the engine's (max abs {_g(d['logits_vs_engine']['max_abs'])})."]
    if v["failures"]:
        lines += ["", "## Failures", ""]
        lines += [f"- `{f['output']}`: {'; '.join(f['reasons'])}" for f in v["failures"]]
    p = report["provenance"]
    vers = ", ".join(f"{k} {val}" for k, val in p["versions"].items() if val)
    seeds = ", ".join(f"{k} {val}" for k, val in p["seeds"].items() if val is not None)
    lines += ["", "## Provenance", "", f"- seeds: {seeds}", f"- versions: {vers}", "- engine built with: "
              + ", ".join(f"{k} {val}" for k, val in e["built_with"].items() if val),
              f"- device: {p['torch_device']}; reference on {p['reference_device']}", f"- created {p['created']}", ""]
    lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def _memory_cell(mem: dict) -> str:
    cell = f"{mem['peak_bytes'] / 2**20:.1f} MiB ({mem['kind']})"
    if mem.get("baseline_bytes") is not None:
        cell += f", {(mem['peak_bytes'] - mem['baseline_bytes']) / 2**20:.1f} MiB above the load baseline"
    return cell


def render_profile(report: dict[str, Any], images: list[str]) -> str:
    lines = ["# dsv3-export profile", ""]
    s = report["settings"]
    lines += [f"Warm-up {s['warmup']} run(s) per configuration excluded; {s['repeats']} timed run(s) of prefill + "
              f"{s['decode_steps']} decode steps each; latencies include the runtime's cache write and greedy "
              "argmax, synchronized per step. TTFT includes the logits of every prompt position (the engines' "
              "step returns [batch, prompt, vocab]); a server that computes only the last position's would not.",
              ""]
    multi = len(report["engines"]) > 1
    lines += [("| engine " if multi else "") + "| batch | prompt | TTFT ms (median) | TPOT ms min / mean / median / p90 / p99 "
              "| decode tok/s | prefill tok/s | peak memory |",
              ("|---" if multi else "") + "|---|---|---|---|---|---|---|"]
    for e in report["engines"]:
        for r in e["results"]:
            head = f"| {e['label']} " if multi else ""
            if r.get("skipped"):
                lines.append(head + f"| {r['batch']} | {r['prompt_len']} | skipped: {r['skipped']} | | | | |")
                continue
            t = r["tpot_ms"]
            mem = r["memory"]
            lines.append(head + f"| {r['batch']} | {r['prompt_len']} | {r['ttft_ms']['median']:.3f} | "
                         f"{t['min']:.3f} / {t['mean']:.3f} / {t['median']:.3f} / {t['p90']:.3f} / {t['p99']:.3f} | "
                         f"{r['decode_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.1f} | "
                         f"{_memory_cell(mem)} |")
    lines.append("")
    for e in report["engines"]:
        lines.append(f"- `{e['label']}`: {e['backend']} {e['device']}/{e['precision']}, CUDA graphs: "
                     f"{e['cuda_graphs']}; device {e['device_name']}; engine sha256 `{e['hash'][:16]}`")
        if e.get("trace"):
            tr = e["trace"]
            lines += ["", f"  Per-op breakdown ({tr['kind']}, `{tr['file']}`), top {len(tr['ops'])} by total time:", "",
                      "  | op | calls | total ms | share |", "  |---|---|---|---|"]
            lines += [f"  | {o['op']} | {o['calls']} | {o['total_ms']:.3f} | {o['share']:.1%} |" for o in tr["ops"]]
            lines.append("")
    lines += ["", *(f"![{name}]({name})" for name in images)]
    return "\n".join(lines) + "\n"
