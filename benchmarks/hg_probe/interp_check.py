import sys, importlib.util, torch
sys.path.insert(0, "/work/main/benchmarks")
from kbench.common import _bootstrap_imports
_bootstrap_imports()
from dsv3_export.kernels import mla_absorb as ka
def load(n):
    s = importlib.util.spec_from_file_location("hg_"+n, f"/work/main/benchmarks/hg_probe/{n}.py"); m = importlib.util.module_from_spec(s); s.loader.exec_module(m); return m
mods = {n: load(n) for n in ("dotT", "fma")}
torch.manual_seed(0)
worst = 0
for dt in (torch.bfloat16, torch.float32):
  for (m, h, k, n, uv) in [(1, 3, 64, 40, False), (3, 2, 100, 24, True), (1, 2, 128, 64, False), (5, 2, 64, 16, True), (17, 2, 48, 33, False), (9,1,160,20,True)]:
    x = torch.randn(m, h, k + 8, dtype=dt)[:, :, 4:4 + k]  # strided like q_nope[:, 0]
    if uv:
        w = torch.randn(h, n, k, dtype=dt).transpose(1, 2)  # K contiguous
    else:
        w = torch.randn(h, k + 5, n, dtype=dt)[:, :k]
    orig = ka.head_gemm(x, w, config=ka.HEAD_GEMM_CONFIGS[0]).float()
    ref = ka.head_gemm_ref(x, w).float()
    for name, mod in mods.items():
        for cname, cfg in mod.CONFIGS.items():
            y = mod.head_gemm(x, w, config=cfg).float()
            e1 = ((y - orig).abs().max() / orig.abs().max()).item(); e2 = ((y - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, e2 if dt == torch.float32 else 0)
            print(f"{str(dt)[6:]:9} M={m} H={h} K={k} N={n} {'UV' if uv else 'UK'} {name:5} {cname:12} maxrel vs orig {e1:.2e} vs ref {e2:.2e}", flush=True)
