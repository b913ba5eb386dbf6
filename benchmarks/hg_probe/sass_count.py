"""Compile head_gemm (orig + probe variants) for sm_90 at the 16b decode shapes, dump SASS, count the K loop."""
import json, os, re, subprocess, sys, tempfile, importlib.util, collections
from pathlib import Path
assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
sys.path.insert(0, "/work/main/benchmarks")
from kbench.common import _bootstrap_imports
_bootstrap_imports()
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia.compiler import get_ptxas
from dsv3_export.kernels import mla_absorb as ka

CUOBJ = Path(get_ptxas(90).path).with_name("cuobjdump")
OUTD = Path("/tmp/hg_sass/out"); OUTD.mkdir(exist_ok=True)

def load(n):
    s = importlib.util.spec_from_file_location("hg_" + n, f"/work/main/benchmarks/hg_probe/{n}.py"); m = importlib.util.module_from_spec(s); s.loader.exec_module(m); return m

# the 16b shapes: UK x = q_nope[:,0] ([b,1,16,192] -> strides (3072, 192, 1)), w [16,128,512] view of wkv_b (strides (256*512, 512, 1))
# UV x = lat [b,16,512] contiguous, w = w_uv.transpose(1,2): [16, 512(c), 128(dv)] strides (256*512, 1, 512)
PROJ = {
    "UK": dict(K=128, N=512, strides=dict(stride_xm=3072, stride_xh=192, stride_xk=1, stride_wh=131072, stride_wk=512, stride_wn=1,
                                          stride_om=8192, stride_oh=512, stride_on=1)),
    "UV": dict(K=512, N=128, strides=dict(stride_xm=8192, stride_xh=512, stride_xk=1, stride_wh=131072, stride_wk=1, stride_wn=512,
                                          stride_om=2048, stride_oh=128, stride_on=1)),
}
CATS = [("LDGSTS", r"^LDGSTS"), ("LDG", r"^LDG"), ("LDSM", r"^LDSM"), ("LDS", r"^LDS"), ("STS", r"^STS"), ("STG", r"^STG"),
        ("HMMA", r"^HMMA"), ("HGMMA", r"^(HGMMA|WARPGROUP)"), ("bar/wait", r"^(BAR|DEPBAR|LDGDEPBAR|WARPSYNC|SYNCS|ARRIVES|MEMBAR|ERRBAR|CCTL)"),
        ("FP32", r"^(FADD|FMUL|FFMA|FMNMX|FSEL|FSETP|FCHK)"), ("cvt", r"^(F2F|F2FP|I2F|F2I|PRMT)"), ("shfl", r"^SHFL"),
        ("mask", r"^(ISETP|PLOP3|P2R|R2P|SEL|VOTE)"), ("int/addr", r"^(IADD|IMAD|LEA|SHF|LOP|MOV|IABS|I2I|IMNMX|UIADD|UIMAD|ULEA|USHF|ULOP|UMOV|S2R|S2UR|R2UR|CS2R|ULDC|LDC|USEL|UISETP|UPLOP|ISCADD|FLO|POPC|BMSK|SGXT|UPRMT|VIADD|VIMNMX|ULDC)"),
        ("NOP", r"^NOP"), ("branch", r"^(BRA|EXIT|BSYNC|BSSY|RET|CALL|YIELD)")]

def cat(op):
    for n, p in CATS:
        if re.match(p, op): return n
    return "other:" + op.split(".")[0]

def parse(sass):
    ins, addr = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            addr[int(m.group(1), 16)] = len(ins)
            txt = re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(2).strip())
            ins.append(txt)
    loops = []
    for i, t in enumerate(ins):
        m = re.match(r"BRA\S*\s+(?:.*?)(0x[0-9a-f]+)", t)
        if m:
            j = addr.get(int(m.group(1), 16))
            if j is not None and j < i:
                loops.append((j, i))
    return ins, loops

def counts(seq):
    c = collections.Counter(cat(t.split()[0]) for t in seq)
    return dict(sorted(c.items()))

def compile_one(kernel, proj, consts, cfg, pointers, label):
    p = PROJ[proj]
    consts = {**consts, **{k: 1 for k, v in p["strides"].items() if v == 1}}
    sig = {}
    for name in kernel.arg_names:
        if name in consts: sig[name] = "constexpr"
        elif name in pointers: sig[name] = pointers[name]
        else: sig[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name not in consts and (name in pointers or name.startswith("stride") or name in ("K", "N"))}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "k.cubin"; f.write_bytes(c.asm["cubin"])
        sass = subprocess.run([str(CUOBJ), "-sass", str(f)], capture_output=True, text=True, check=True).stdout
        use = subprocess.run([str(CUOBJ), "--dump-resource-usage", str(f)], capture_output=True, text=True, check=True).stdout
    safe = re.sub(r"[^\w]+", "_", label)
    (OUTD / f"{safe}.sass").write_text(sass); (OUTD / f"{safe}.ttgir").write_text(c.asm["ttgir"])
    ins, loops = parse(sass)
    reg = re.search(r"REG:(\d+) STACK:(\d+)", use)
    ttgir = c.asm["ttgir"]
    wpc = sorted(set(re.findall(r"#(?:ttg\.)?nvidia_mma<\{[^}]*?versionMajor = (\d+)[^}]*?warpsPerCTA = \[([\d, ]+)\][^}]*?instrShape = \[([\d, ]+)\]", ttgir)))
    if not wpc:
        wpc = sorted(set(re.findall(r"nvidia_mma<\{(.*?)\}>", ttgir)))
    row = dict(label=label, regs=int(reg.group(1)), stack=int(reg.group(2)), smem=c.metadata.shared, n_sass=len(ins), mma=wpc)
    if loops:
        s, e = max(loops, key=lambda l: l[1] - l[0])
        row.update(loop_len=e - s + 1, loop=counts(ins[s:e + 1]), n_loops=len(loops))
    row["total"] = counts(ins)
    return row

def main():
    bf = "*bf16"; ptrs = dict(x_ptr=bf, w_ptr=bf, out_ptr=bf)
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    jobs = []
    if which in ("all", "orig"):
        for i, cfg in enumerate(ka.HEAD_GEMM_CONFIGS):
            for proj in ("UK", "UV"):
                jobs.append((ka._head_gemm_kernel, proj, dict(UPCAST=False, **cfg.kwargs), cfg, f"orig c{i} {proj} BM{cfg.kwargs['BLOCK_M']} BN{cfg.kwargs['BLOCK_N']} BK{cfg.kwargs['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"))
    if which in ("all", "var"):
        dt = load("dotT"); fm = load("fma")
        for cname, cfg in dt.CONFIGS.items():
            for proj in ("UK", "UV"):
                K, N = PROJ[proj]["K"], PROJ[proj]["N"]
                jobs.append((dt._head_gemm_kernel, proj, dict(UPCAST=False, EVEN_K=K % cfg.kwargs["BLOCK_K"] == 0, EVEN_N=N % cfg.kwargs["BLOCK_N"] == 0, **cfg.kwargs), cfg, f"dotT {cname} {proj}"))
        for cname, cfg in fm.CONFIGS.items():
            for proj in ("UK", "UV"):
                K, N = PROJ[proj]["K"], PROJ[proj]["N"]
                jobs.append((fm._head_gemm_kernel, proj, dict(BLOCK_K=K, EVEN_K=True, EVEN_N=N % cfg.kwargs["BLOCK_N"] == 0, **cfg.kwargs), cfg, f"fma {cname} {proj}"))
    for kern, proj, consts, cfg, label in jobs:
        try:
            row = compile_one(kern, proj, consts, cfg, ptrs, label)
        except Exception as e:
            row = dict(label=label, error=f"{type(e).__name__}: {str(e)[:400]}")
        print(json.dumps(row), flush=True)

main()
