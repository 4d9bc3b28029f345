"""The GPU-only paths (inline PTX, wgmma layouts) compile for Hopper without a GPU: Triton's compiler and the
ptxas shipped in its wheel build sm_90 code on the CPU. Catches what the interpreter cannot (constexpr misuse,
inline-asm operand lists, PTX syntax) before a GPU run does. Runs in a subprocess: the test session's kernels
are interpreter objects (TRITON_INTERPRET=1 is set before they are defined)."""

import json
import os
import re
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from p3quant.kernels import act_quant, argmax, decode_attention, dequant_w4, gemm_w4, kv_append, rmsnorm, rope, silu_mul, w4_mma


def compile_ptx(fn, types, constexprs, divisible=(), arch=90, **options):
    # pointers and the named integer arguments as Triton specializes them at run time (multiples of 16)
    names = fn.arg_names
    signature = dict(zip(names, types + ["constexpr"] * (len(names) - len(types))))
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types) if t.startswith("*") or names[i] in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]


out = {}
mma_types = ["*fp16", "*fp32", "*i32", "*fp16", "*u8", "*bf16", "*bf16", "*fp32"] + ["i32"] * 9
# W4A8 with split-K partials; W4A8 with the fused epilogue; W4A16 in bf16; the other operand variants
# (gemm_w4.MMA_VARIANT): W4A8 on FP8 tensor cores (the default on FP8 GPUs), quarter-planes in W4A8 and W4A16
for name, is_bitmod, block_m, split_k, x_type, quarters in (
        ("mma_bitmod=True", True, 16, 2, "*fp16", False), ("mma_bitmod=False", False, 64, 1, "*fp16", False),
        ("mma_w4a16_bf16", True, 32, 1, "*bf16", False), ("mma_fp8", True, 16, 1, "*fp8e4nv", False),
        ("mma_quarters", True, 16, 2, "*fp16", True), ("mma_quarters_w4a16_bf16", False, 16, 1, "*bf16", True)):
    out[name] = compile_ptx(
        w4_mma._w4_mma_kernel, [x_type] + mma_types[1:],
        dict(GROUP=128, BLOCK_N=64, BLOCK_M=block_m, SPLIT_K=split_k, IS_BITMOD=is_bitmod, HAS_BIAS=True, USE_ASM=True,
             ROW_SCALE=x_type != "*bf16", BF16=x_type == "*bf16", NATIVE_BF16=True, FP8=x_type == "*fp8e4nv",
             QUARTERS=quarters, PDL=True),
        divisible=("K", "stride_xm", "stride_ww", "stride_ym"), num_warps=4, num_stages=4)
for is_bitmod in (True, False):
    out[f"dequant_bitmod={is_bitmod}"] = compile_ptx(
        dequant_w4._dequant_kernel, ["*i32", "*fp16", "*u8", "*fp16"] + ["i32"] * 6,
        dict(GROUP=128, BLOCK_N=16, BLOCK_G=4, IS_BITMOD=is_bitmod, USE_ASM=True),
        divisible=("KW", "s_w", "s_o"), num_warps=4)
for is_bitmod in (True, False):  # the FP8 operand of the block-scaled prefill GEMM
    for use_asm in (True, False):
        out[f"weight_values_fp8_bitmod={is_bitmod}_asm={use_asm}"] = compile_ptx(
            dequant_w4._values_fp8_kernel, ["*i32", "*fp16", "*u8", "*fp8e4nv", "*fp32"] + ["i32"] * 6,
            dict(GROUP=128, BLOCK_N=16, BLOCK_G=4, IS_BITMOD=is_bitmod, USE_ASM=use_asm),
            divisible=("KW", "s_w", "s_o"), num_warps=4)
out["epilogue"] = compile_ptx(w4_mma._rows_epilogue_kernel, ["*fp32", "*fp32", "*bf16", "*bf16"] + ["i32"] * 3,
                              dict(SPLIT_K=4, BLOCK=1024, IS_BITMOD=True, HAS_BIAS=True, ROW_SCALE=True, PDL=True), num_warps=4)
# one weight (with and without programmatic dependent launch); q/k/v-style segments (the segment choice reassigns
# pointers at run time)
gemv_n, gemv_k, gemv_warps, gemv_stages = gemm_w4._gemv_config()  # the shipped launch configuration
# W4A16 (no token scale) with its activations' split-layout kernel
for name, segments, pdl, row_scale in (("gemv_1", 1, True, True), ("gemv_3", 3, True, True), ("gemv_1_no_pdl", 1, False, True),
                                       ("gemv_a16", 3, True, False)):
    out[name] = compile_ptx(
        gemm_w4._w4_gemv_kernel, gemm_w4.GEMV_ARG_TYPES,
        dict(KW=512, SEGMENTS=segments, GROUP=128, BLOCK_N=gemv_n, BLOCK_K=gemv_k, IS_BITMOD=True, HAS_BIAS=segments > 1,
             USE_ASM=True, EVEN_K=True, ROW_SCALE=row_scale, PDL=pdl), divisible=("K", "stride_xm", "stride_wn"),
        num_warps=gemv_warps, num_stages=gemv_stages)
out["split_16bit"] = compile_ptx(act_quant._split_16bit_kernel, ["*bf16", "*fp32", "i32", "i32", "i32"],
                                 dict(BLOCK_K=act_quant.SPLIT_16BIT_BLOCK, PDL=True), divisible=("K", "stride_xm", "stride_qm"),
                                 num_warps=16)
# name, codes type, BLOCK_K, layout (in order, split, half-planes), one pass, scale copies, native E4M3 + PDL, arch, warps;
# sm_80 (no E4M3 conversions) takes the arithmetic rounding: the same kernel builds there
for name, q_type, block, layout, one_pass, copies, sm90, arch, warps in (
        ("act_quant_0", "*fp8e4nv", 4096, 0, True, 1, True, 90, 16), ("act_quant_1", "*fp32", 4096, 1, True, 1, True, 90, 16),
        ("act_quant_2", "*fp16", 4096, 2, True, 1, True, 90, 16), ("act_quant_two_pass", "*fp8e4nv", 4096, 0, False, 1, True, 90, 16),
        ("act_quant_block_scales", "*fp8e4nv", 4096, 0, False, 128, True, 90, 16),
        ("act_quant_16384", "*fp32", 16384, 1, True, 1, True, 90, 32), ("act_quant_sm80", "*fp32", 4096, 1, True, 1, False, 80, 16)):
    out[name] = compile_ptx(act_quant._act_quant_kernel, ["*bf16", q_type, "*fp32"] + ["i32"] * 6,
                            dict(BLOCK_K=block, LAYOUT=layout, ONE_PASS=one_pass, COPIES=copies, NATIVE_E4M3=sm90, PDL=sm90),
                            divisible=("K", "stride_xm", "stride_qm"), arch=arch, num_warps=warps)
out["rmsnorm_sm80"] = compile_ptx(rmsnorm._rmsnorm_kernel, ["*bf16"] * 3 + ["*fp32", "*fp32", "i32", "fp32", "i32", "i32", "i32"],
                                  dict(BLOCK_K=4096, LAYOUT=1, NATIVE_E4M3=False, PDL=False),
                                  divisible=("K", "stride_xm", "stride_ym", "stride_qm"), arch=80, num_warps=16)
out["silu_mul"] = compile_ptx(silu_mul._silu_mul_kernel, ["*bf16", "*bf16", "*bf16", "*fp32"] + ["i32"] * 5,
                              dict(BLOCK_K=1024, WANT_AMAX=True, PDL=True), divisible=("K", "stride_gm", "stride_um", "stride_ym"),
                              num_warps=4)
out["chunk_codes"] = compile_ptx(act_quant._codes_from_chunk_amax_kernel, ["*bf16", "*fp32", "*fp32", "*fp32"] + ["i32"] * 4,
                                 dict(BLOCK_K=1024, CP=16, LAYOUT=1, NATIVE_E4M3=True, PDL=True),
                                 divisible=("K", "stride_ym", "stride_qm"), num_warps=4)
out["rope"] = compile_ptx(rope._rope_kernel, ["*bf16"] * 6 + ["i32"] * 17, dict(D=128, HB=4, DP=128, PDL=True), num_warps=1)
attention_shape = dict(G=4, GP=16, G4=4, D8=16, DW=16, BLOCK_T=128, BLOCK_R=16, USE_ASM=True, DEVICE_LEN=True, PDL=True)
out["scores"] = compile_ptx(decode_attention._scores_kernel, ["*bf16", "*fp32", "*i32", "*fp16", "*u8", "*fp16", "*bf16", "*u8"]
                            + ["*fp32"] * 4 + ["*i64", "i32", "i32", "i32", "fp32", "fp32", "i32", "i32"] + ["i32"] * 22,
                            dict(attention_shape, HAS_SMOOTH=True, QUANT_Q=True, HAS_MASK=True, HAS_SOFTCAP=True, NATIVE_E4M3=True),
                            num_warps=4)
out["pv"] = compile_ptx(decode_attention._pv_kernel, ["*i32", "*fp16", "*u8", "*bf16"] + ["*fp32"] * 5 + ["*i64"] + ["i32"] * 19,
                        dict(attention_shape, SP=64, HALF_UP=False), num_warps=4)
# head_dim 16 (2 words per token, padded to the 8 of the smallest dot-able quarter-plane) and 80 (10 words, padded to 16)
for d8, dw in ((2, 8), (10, 16)):
    small = dict(attention_shape, D8=d8, DW=dw)
    out[f"scores_d{8 * d8}"] = compile_ptx(
        decode_attention._scores_kernel, ["*bf16", "*fp32", "*i32", "*fp16", "*u8", "*fp16", "*bf16", "*u8"] + ["*fp32"] * 4
        + ["*i64", "i32", "i32", "i32", "fp32", "fp32", "i32", "i32"] + ["i32"] * 22,
        dict(small, HAS_SMOOTH=True, QUANT_Q=True, HAS_MASK=True, HAS_SOFTCAP=False), num_warps=4)
    out[f"pv_d{8 * d8}"] = compile_ptx(decode_attention._pv_kernel, ["*i32", "*fp16", "*u8", "*bf16"] + ["*fp32"] * 5 + ["*i64"]
                                       + ["i32"] * 19, dict(small, SP=64, HALF_UP=True), num_warps=4)
out["argmax_chunks"] = compile_ptx(argmax._chunk_argmax_kernel, ["*bf16", "*fp32", "*i32", "*i32", "i32", "i32", "i32"],
                                   dict(BLOCK=4096, PDL=True), num_warps=8)
out["argmax_pick"] = compile_ptx(argmax._pick_kernel, ["*fp32", "*i32", "*i32", "*i64", "i32", "i32"], dict(CP=32, PDL=True), num_warps=1)
out["combine"] = compile_ptx(decode_attention._combine_kernel, ["*fp32", "*bf16", "i32", "i32"], dict(BLOCK_S=16, BLOCK_D=128, PDL=True), num_warps=4)
out["kv_at"] = compile_ptx(kv_append._int4_kv_at_kernel, ["*bf16", "*fp32", "*u8", "*fp16", "*u8", "*bf16", "*bf16", "*u8", "*fp16",
                                                           "*u8", "*bf16", "*i64"] + ["i32"] * 32,
                           dict(HALF_D=64, DH=64, HAS_DIV=True, PDL=True), num_warps=1)
out["rmsnorm"] = compile_ptx(rmsnorm._rmsnorm_kernel, ["*bf16"] * 3 + ["*fp32", "*fp32", "i32", "fp32", "i32", "i32", "i32"],
                             dict(BLOCK_K=4096, LAYOUT=1, NATIVE_E4M3=True, PDL=True),
                             divisible=("K", "stride_xm", "stride_ym", "stride_qm"), num_warps=16)
# the tiled kernel (where MMA_MAX_M and DEQUANT_MIN_M leave a gap) with FP8 x FP8 tensor cores, and in bf16
# (W4A16); the prefill's KV-cache quantization
mm_types = ["*fp16", "*fp32", "*u8", "*fp16", "*u8", "*bf16", "*bf16"] + ["i32"] * 9
for name, x_type, a_fp8 in (("mm_fp8", "*fp8e4nv", True), ("mm_bf16", "*bf16", False)):
    out[name] = compile_ptx(gemm_w4._w4_mm_kernel, [x_type] + mm_types[1:],
                            dict(GROUP=128, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, IS_BITMOD=True, A_FP8=a_fp8,
                                 FP8_DOT=a_fp8, HAS_BIAS=True, NATIVE_BF16=True),
                            divisible=("K", "stride_xm", "stride_wn", "stride_ym"), num_warps=4, num_stages=3)
out["int4_rows"] = compile_ptx(kv_append._int4_rows_kernel, ["*bf16", "*fp32", "*u8", "*fp16", "*u8"] + ["i32"] * 16,
                               dict(HALF_D=64, DH=64, BLOCK_T=16, HAS_DIV=True), num_warps=4)
# An A100 (sm_80: no FP8 conversions or MMAs, no wgmma, no programmatic dependent launch) takes the same kernels
# with the flags its launches pass: they must build there too
sm80 = dict(arch=80)
out["gemv_sm80"] = compile_ptx(
    gemm_w4._w4_gemv_kernel, gemm_w4.GEMV_ARG_TYPES,
    dict(KW=512, SEGMENTS=3, GROUP=128, BLOCK_N=gemv_n, BLOCK_K=gemv_k, IS_BITMOD=True, HAS_BIAS=True, USE_ASM=True,
         EVEN_K=True, PDL=False), divisible=("K", "stride_xm", "stride_wn"), num_warps=gemv_warps, num_stages=gemv_stages, **sm80)
for name, quarters in (("mma_sm80", False), ("mma_quarters_sm80", True)):
    out[name] = compile_ptx(
        w4_mma._w4_mma_kernel, ["*fp16"] + mma_types[1:],
        dict(GROUP=128, BLOCK_N=64, BLOCK_M=16, SPLIT_K=2, IS_BITMOD=True, HAS_BIAS=True, USE_ASM=True, ROW_SCALE=True,
             BF16=False, NATIVE_BF16=True, QUARTERS=quarters, PDL=False),
        divisible=("K", "stride_xm", "stride_ww", "stride_ym"), num_warps=4, num_stages=3, **sm80)
out["mm_sm80"] = compile_ptx(
    gemm_w4._w4_mm_kernel, mm_types,  # fp16 codes
    dict(GROUP=128, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, IS_BITMOD=True, A_FP8=True, FP8_DOT=False,
         HAS_BIAS=True, NATIVE_BF16=True), divisible=("K", "stride_xm", "stride_wn", "stride_ym"), num_warps=4, num_stages=3, **sm80)
out["dequant_sm80"] = compile_ptx(dequant_w4._dequant_kernel, ["*i32", "*fp16", "*u8", "*fp16"] + ["i32"] * 6,
                                  dict(GROUP=128, BLOCK_N=16, BLOCK_G=4, IS_BITMOD=True, USE_ASM=True),
                                  divisible=("KW", "s_w", "s_o"), num_warps=4, **sm80)
out["scores_sm80"] = compile_ptx(decode_attention._scores_kernel, ["*bf16", "*fp32", "*i32", "*fp16", "*u8", "*fp16", "*bf16", "*u8"]
                                 + ["*fp32"] * 4 + ["*i64", "i32", "i32", "i32", "fp32", "fp32", "i32", "i32"] + ["i32"] * 22,
                                 dict(attention_shape, HAS_SMOOTH=True, QUANT_Q=True, HAS_MASK=True, HAS_SOFTCAP=True,
                                      NATIVE_E4M3=False, PDL=False), num_warps=4, **sm80)
out["pv_sm80"] = compile_ptx(decode_attention._pv_kernel, ["*i32", "*fp16", "*u8", "*bf16"] + ["*fp32"] * 5 + ["*i64"] + ["i32"] * 19,
                             dict(attention_shape, SP=64, HALF_UP=False, PDL=False), num_warps=4, **sm80)
out["kv_at_sm80"] = compile_ptx(kv_append._int4_kv_at_kernel, ["*bf16", "*fp32", "*u8", "*fp16", "*u8", "*bf16", "*bf16", "*u8",
                                                                "*fp16", "*u8", "*bf16", "*i64"] + ["i32"] * 32,
                                dict(HALF_D=64, DH=64, HAS_DIV=True, PDL=False), num_warps=1, **sm80)
out["chunk_codes_sm80"] = compile_ptx(act_quant._codes_from_chunk_amax_kernel, ["*bf16", "*fp32", "*fp32", "*fp32"] + ["i32"] * 4,
                                      dict(BLOCK_K=1024, CP=16, LAYOUT=1, NATIVE_E4M3=False, PDL=False),
                                      divisible=("K", "stride_ym", "stride_qm"), num_warps=4, **sm80)
print(json.dumps(out))
"""


def _compile_all() -> dict[str, str]:
    try:
        import triton.backends.nvidia as nvidia
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("needs Triton's NVIDIA backend and its AOT compiler API")
    if not os.path.exists(os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")):
        pytest.skip("needs the ptxas shipped in Linux Triton wheels")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gpu_kernels_compile_for_hopper_with_their_inline_ptx():
    ptx = _compile_all()
    assert "fma.rn.bf16x2" in ptx["mma_w4a16_bf16"]  # the bf16 decode
    assert re.search(r"mma[^\n]*bf16", ptx["mma_w4a16_bf16"])  # bf16 tensor-core operands
    int4_fp16_decode = "fma.rn.f16x2 d, d,"  # INT4's fp16 decode without tables (common._DECODE_INT4)
    for fmt in ("mma_bitmod=True", "mma_bitmod=False", "mma_w4a16_bf16", "mma_fp8", "mma_quarters", "mma_quarters_w4a16_bf16"):
        inlined = int4_fp16_decode if fmt == "mma_bitmod=False" else "xor.b32 wn"  # the tables' decode
        assert inlined in ptx[fmt] and "prmt.b32" in ptx[fmt], fmt  # the decode is inlined
        assert "wgmma" in ptx[fmt] or "mma.sync" in ptx[fmt], fmt  # tensor cores
    assert re.search(r"wgmma[^\n]*e4m3\.e4m3", ptx["mma_fp8"])  # FP8 x FP8 on Hopper's tensor cores
    for fmt in ("dequant_bitmod=True", "dequant_bitmod=False"):
        assert "cvt.rn.f16x2.f32" in ptx[fmt], fmt  # one rounding per weight
        assert "st.global.v4" in ptx[fmt], fmt  # four fp16 pairs per 16-byte store
    # exact fp16 pairs to E4M3 pairs (every value is an E4M3 number), a word's 8 bytes in one 8-byte store
    for is_bitmod in (True, False):  # E4M3 pairs from exact fp16 pairs (PTX) or fp32 values; 8 bytes per int64 store
        asm, plain = (ptx[f"weight_values_fp8_bitmod={is_bitmod}_asm={a}"] for a in (True, False))
        assert "cvt.rn.satfinite.e4m3x2.f16x2" in asm and "cvt.rn.satfinite.e4m3x2.f32" in plain
        assert "st.global.v2.b64" in asm and "st.global.v2.b64" in plain
    assert "ld.global" in ptx["epilogue"]
    assert all("st.global" in ptx[f"act_quant_{layout}"] for layout in range(3))
    # the row mask that pads rows past M keeps the activations' loads vectorized (16 bytes per load)
    assert all("ld.global.v4" in ptx[name] for name in ("act_quant_0", "act_quant_1", "act_quant_block_scales"))
    # compiled kernels round to E4M3 with the GPU's conversion on sm_89+ (common.native_e4m3) and arithmetically
    # below; bf16 outputs by the cast, not by round_minifloat (whose magic constant 1.5 * 2**23 is 0f4B400000)
    for name in ("act_quant_0", "act_quant_1", "act_quant_two_pass", "act_quant_16384", "chunk_codes", "rmsnorm", "scores"):
        assert "cvt.rn.satfinite.e4m3x2.f32 q" in ptx[name], name
    for name in ("act_quant_sm80", "rmsnorm_sm80", "scores_sm80", "chunk_codes_sm80"):
        assert "e4m3" not in ptx[name] and "0f4B400000" in ptx[name], name
    for name in ("gemv_sm80", "mma_sm80", "mma_quarters_sm80", "mm_sm80", "dequant_sm80", "pv_sm80", "kv_at_sm80"):  # built for sm_80
        assert ".target sm_80" in ptx[name] and "griddepcontrol" not in ptx[name] and "wgmma" not in ptx[name], name
    assert "0f4B400000" not in ptx["silu_mul"] and "cvt.rn.bf16" in ptx["silu_mul"]
    assert "e4m3" in ptx["mm_fp8"] and "mma" in ptx["mm_fp8"] and "mma" in ptx["mm_bf16"]  # FP8 / bf16 tensor cores
    assert "st.global" in ptx["int4_rows"] and "st.global" in ptx["split_16bit"]
    for gemv in ("gemv_1", "gemv_3", "gemv_a16"):
        assert "0x7354" in ptx[gemv] and "fma.rn.f32 s, f," in ptx[gemv]  # the M = 1 GEMV's decode + FMAs in PTX
    assert "st.global" in ptx["argmax_chunks"] and "st.global" in ptx["argmax_pick"]
    assert "mma" in ptx["scores"] and "mma" in ptx["pv"]  # q.k and P.V on tensor cores
    for name in ("scores", "pv", "scores_d16", "pv_d16", "scores_d80", "pv_d80"):
        assert int4_fp16_decode in ptx[name] and "mma" in ptx[name], name  # PTX decode of packed K / V, tensor-core dots
    assert "st.global" in ptx["rope"] and "st.global" in ptx["combine"] and "st.global" in ptx["kv_at"]
    assert "ex2.approx" in ptx["silu_mul"] and "div.rn.f32" in ptx["silu_mul"]  # SiLU's exponential and division
    assert "div.rn.f32" in ptx["chunk_codes"] and "st.global" in ptx["chunk_codes"]  # the FP8 codes' division


def _global_accesses(ptx: str) -> list[tuple[int, str]]:
    access = r"((ld|st|atom|red)\.global|cp\.async)"  # loads, stores, atomics, asynchronous copies to shared memory
    found = ((i, re.match(r"\s*(@!?%p\d+\s+)?" + access, line)) for i, line in enumerate(ptx.splitlines()))
    return [(i, m.group(2)) for i, m in found if m]


def test_decode_kernels_wait_for_the_previous_kernel_before_touching_its_data():
    """Programmatic dependent launch: every decode-step kernel lets its successor launch and waits for its
    predecessor before any global load or store; only the GEMV's first weight tiles and the norm's weight (which no
    kernel writes) are read before the wait."""
    ptx = _compile_all()
    no_pdl = ("dequant", "weight_values", "mm_", "int4_rows")  # kernels launched without it
    pdl = [name for name in ptx if name != "gemv_1_no_pdl" and not name.startswith(no_pdl)
           and not name.endswith("_sm80")]  # sm_80 has no programmatic dependent launch
    for name in pdl:
        lines = ptx[name].splitlines()
        waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
        assert len(waits) == 1 and any("griddepcontrol.launch_dependents" in line for line in lines), name
        early = [op for i, op in _global_accesses(ptx[name]) if i < waits[0]]
        if name.startswith("gemv"):
            assert early and all(op.startswith("ld") for op in early), name  # the first K-step's weights, prefetched
        elif name == "rmsnorm":
            assert early and all(op.startswith("ld") for op in early), name
        else:
            assert not early, (name, early)
    assert "griddepcontrol" not in ptx["gemv_1_no_pdl"]


def test_pdl_mode_switches_and_restores_but_never_applies_off_a_gpu():
    import torch

    from p3quant.kernels import common

    before = common.USE_PDL
    with common.pdl_mode(not before):
        assert common.USE_PDL is (not before)
        with common.pdl_mode(True):
            assert common.USE_PDL and not common.pdl_enabled(torch.ones(1))  # CPU tensors, the interpreter
            assert common.pdl_launch(torch.ones(1)) == {"PDL": False}  # no launch_pdl: Triton < 3.3 rejects it
        assert common.USE_PDL is (not before)
    assert common.USE_PDL is before


def test_gpu_only_paths_are_chosen_per_device(monkeypatch):
    """Inline PTX only on NVIDIA GPUs outside the interpreter; the native E4M3 rounding only from compute
    capability 8.9 (older GPUs and ROCm keep the arithmetic rounding their kernels compile with)."""
    import torch

    from p3quant.kernels import common

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert not common.nvidia_compiled(cpu) and not common.native_e4m3(cpu)
    assert not common.nvidia_compiled(cuda)  # the test session runs the interpreter
    monkeypatch.setattr(common, "interpreting", lambda: False)
    for capability, native in (((8, 0), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(common, "device_capability", lambda index, c=capability: c)
        assert common.nvidia_compiled(cuda) and common.native_e4m3(cuda) == native and not common.native_e4m3(cpu)
        assert common.fp8_dot_supported(cuda) == native
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert not common.nvidia_compiled(cuda) and not common.native_e4m3(cuda) and not common.fp8_dot_supported(cuda)
