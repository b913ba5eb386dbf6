"""Triton kernels for the dsv3:: ops (CUDA implementations; pure functions of tensors).

One family per module, each with its kernel(s), a checking launcher and a pure-torch `*_ref`:
  fp8_quant       act_quant (1x128 activation quant), weight_dequant (128x128 blocks)
  fp8_gemm        fp8_gemm (blockwise-scaled, split-K for decode, the split-K sum kernel), fp8_linear =
                  act_quant + fp8_gemm; fp8_gemm_persistent: the TMA persistent prefill candidate
  fp8_gemv        fp8_gemv / moe_gemv: W8A8 for a few rows, the activation quantized in registers (decode)
  moe             grouped_gemm (fp8 or bf16, fused SwiGLU / routing weight), fused_moe; moe_align re-exported
  moe_align       moe_align (token assignments grouped and padded per expert), moe_align_ref (ATen form)
  mla_attention   the MLA family's entry point: shared checks, mla_decode_ref / mla_prefill_ref, and
                  the names of mla_decode / mla_prefill re-exported
  mla_decode      mla_decode (split-KV flash-decoding over the latent cache, the splits merged by a second kernel)
  mla_decode_kernels  mla_decode's Triton kernels (the split kernel, the reduce kernel)
  mla_splits      how many KV splits mla_decode uses: choose_num_splits (host), the runtime rule (traced)
  mla_prefill     mla_prefill (causal)
  mla_absorb      head_gemm: MLA's absorbed per-head projections (W_UK, W_UV); head_gemv, its CUDA-core
                  form for one or two rows (W_UV in the batch-1 decode step)
  mla_merge_uv    mla_merge_uv: mla_decode's split merge and W_UV's head_gemv in one launch (batch <= 2 decode)
  topk            router_topk: the softmax MoE router (softmax, top-k, weights, the shared experts'
                  columns) from its logits (or from router_gate's partials), one launch
  router_gate     gate_partials: the decode MoE gate GEMM split over K into fp32 partials (and act_quant(x)
                  from the same loads), which the router kernel sums
  pdl             which kernels wait for their producer (programmatic dependent launch, on by default on sm_90+)
  wait_first_source  what a kernel's source calls before that wait (no triton import: Inductor's kernels too)

Launch path: in eager mode a launcher calls the jitted (autotuned) kernel directly, a few us of
Python; only while make_fx / torch.export / torch.compile trace it does the launch go through
torch.library.wrap_triton (_common.traceable), whose eager form costs ~0.7 ms per launch on the H200
host. tests/kernels/_launch_probe.py measures that path on the CPU with the GPU launch mocked.

Importing this package does not import triton; the modules do. On a CPU machine the kernels run
under TRITON_INTERPRET=1 (set before the modules are imported), launching one config; on a GPU
they are autotuned. `python -m tests.kernels._sm90_compile --all-configs --ptxas-v` compiles every
kernel x config for sm_90 without a GPU (registers, spills, shared memory, wgmma use).
"""
