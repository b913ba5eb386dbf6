"""Check kernels/fp8_gemm_gluon.py against fp8_gemm_ref on a Hopper GPU, compiled (not interpreted).

Run as `python -m tests.kernels._hopper_gluon_check SEED` WITHOUT TRITON_INTERPRET: tests/kernels/test_fp8_gemm_gluon.py
runs it in a subprocess, because this folder's conftest sets TRITON_INTERPRET=1 for its Triton kernels, and under it
triton's own jit helpers (gl.cdiv in the Gluon kernels' schedule) are interpreter functions that a Gluon compile
cannot call (session 34: it passed before only when another process had left the kernels in Triton's cache).
One JSON line per case: form, shape, programs, scale strides, mean relative error, finite.
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET to compile"

import torch  # noqa: E402

from dsv3_export.kernels import fp8_gemm as G  # noqa: E402
from dsv3_export.kernels import fp8_quant as KQ  # noqa: E402
from dsv3_export.kernels.fp8_gemm_gluon import fp8_gemm_gluon  # noqa: E402
from dsv3_export.reference import fp8 as R  # noqa: E402
from tests.kernels._helpers import mean_rel  # noqa: E402

FORMS = ("warp-specialized", "single 128", "single 64")
# Ragged M, N and K (odd K-block counts take the padded block; K <= 384 fewer blocks than stages). The
# warp-specialized form (4 blocks per iteration) runs 1-2 K blocks as a last pair only, 4, 11 and 16 as groups only,
# 5 (its pad block in the pair) and 6 as a group and a last pair (_ws_pair).
SHAPES = ((200, 264, 400), (1, 128, 2048), (300, 136, 1296), (130, 256, 128), (200, 264, 256), (150, 136, 640),
          (150, 136, 768))


def check(seed: int) -> None:
    for m, n, k in SHAPES:
        torch.manual_seed(seed + m + n + k)
        x = torch.randn(m, k, device="cuda") * 2
        a, a_s = R.act_quant(x)
        b, b_s = R.weight_quant(torch.randn(n, k, device="cuda") / k**0.5)
        ref = G.fp8_gemm_ref(a, a_s, b, b_s, torch.float32)
        # row-major scales (the warp-specialized form copies them outer-dim-major), outer-dim-major ones as act_quant
        # writes them (16-byte aligned rows: taken as they are) and as a transpose leaves them (copied when M is not
        # a multiple of 4)
        scales = ((None, a_s), (2, a_s), (2, KQ.act_quant(x, outer_scales=True)[1]), (None, a_s.t().contiguous().t()))
        for form in FORMS:
            kw = dict(warp_specialized=True) if form == "warp-specialized" else \
                dict(warp_specialized=False, block_m=int(form.split()[1]))
            for programs, s in scales:
                out = fp8_gemm_gluon(a, s, b, b_s, torch.float32, programs=programs, **kw)
                print(json.dumps(dict(form=form, m=m, n=n, k=k, programs=programs, out="fp32",
                                      scale_strides=list(s.stride()), err=mean_rel(out, ref),
                                      finite=bool(torch.isfinite(out).all()))), flush=True)
        out = G.fp8_gemm(a, a_s, b, b_s, variant="gluon")  # bf16, through fp8_gemm
        print(json.dumps(dict(form="fp8_gemm(variant='gluon')", m=m, n=n, k=k, programs=None, out="bf16",
                              scale_strides=list(a_s.stride()), err=mean_rel(out, ref),
                              finite=bool(torch.isfinite(out).all()))), flush=True)


if __name__ == "__main__":
    check(int(sys.argv[1]))
