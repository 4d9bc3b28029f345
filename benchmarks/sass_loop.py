"""Machine instructions per 32-bit weight word (8 weights) in the main loop of the M = 1 GEMV, without a GPU.

Triton compiles the kernel for sm_90 on the CPU (its wheel carries ptxas and cuobjdump); the script disassembles
the cubin, finds the loop (the backward branch) and counts its instructions by opcode. It is how RESULTS.md's
"instructions per word" figures were taken: a cheap check of a kernel change before spending GPU time.

Run: python benchmarks/sass_loop.py [--configs '4,1024,1;8,1024,2'] [--segments 3] [--pdl], or --attention for
the decode-attention passes, --conversions for the prefill's weight conversions (dequant_w4), or --small-m for the
small-M kernel's operand variants (gemm_w4.MMA_VARIANT).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from p3quant.kernels import gemm_w4

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(fn, types: list[str], constexprs: dict, divisible: tuple[str, ...] = (), **options):
    """Compile a @triton.jit function for sm_90, with pointers and the named integers specialized as multiples
    of 16 (as Triton does at run time for such values)."""
    names = fn.arg_names
    signature = dict(zip(names, types + ["constexpr"] * (len(names) - len(types))))
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types) if t.startswith("*") or names[i] in divisible}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def loop_opcodes(cubin: bytes) -> collections.Counter:
    """Opcodes of the instructions between the first backward branch and its target."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", fh.name], capture_output=True, text=True, check=True).stdout
    ins = []
    for line in sass.splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    for addr, op, rest in ins:
        target = re.search(r"BRA\s+(0x[0-9a-f]+)", op + " " + rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            return collections.Counter(o.split(".")[0] for a, o, _ in ins if start <= a <= addr)
    raise RuntimeError("no loop found in the kernel")


def registers(cubin: bytes) -> int:
    """Registers per thread of the compiled kernel (they bound how many warps an SM holds)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", fh.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


def all_opcodes(cubin: bytes) -> collections.Counter:
    """Opcodes of all machine instructions of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", fh.name], capture_output=True, text=True, check=True).stdout
    found = (re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line) for line in sass.splitlines())
    return collections.Counter(m.group(1).split(".")[0] for m in found if m)


def total_instructions(cubin: bytes) -> int:
    """All machine instructions of a compiled kernel."""
    return sum(all_opcodes(cubin).values())


def conversion_counts() -> None:
    """Instructions per program (16 rows x 4 groups of 128, 4 warps) of the prefill's weight conversions: the fp16
    dequantization and the FP8 values, each with its PTX and its pure-Triton decode; STS / LDS are shared-memory
    round trips (layout conversions)."""
    from p3quant.kernels import dequant_w4

    for name, fn, types in (("fp16 dequant", dequant_w4._dequant_kernel, ["*i32", "*fp16", "*u8", "*fp16"] + ["i32"] * 6),
                            ("FP8 values", dequant_w4._values_fp8_kernel, ["*i32", "*fp16", "*u8", "*fp8e4nv", "*fp32"] + ["i32"] * 6)):
        for is_bitmod in (True, False):
            for use_asm in (True, False):
                cubin = compile_sm90(fn, types, dict(GROUP=128, BLOCK_N=16, BLOCK_G=4, IS_BITMOD=is_bitmod, USE_ASM=use_asm),
                                     divisible=("KW", "s_w", "s_o"), num_warps=4).asm["cubin"]
                ops = all_opcodes(cubin)
                print(f"{name}, {'BitMoD' if is_bitmod else 'INT4'}, {'PTX' if use_asm else 'pure-Triton'} decode: "
                      f"{sum(ops.values())} instructions, {registers(cubin)} registers, STS {ops['STS']}, LDS {ops['LDS']}")


def attention_counts() -> None:
    """Instructions per thread of the decode-attention passes' block loop (128- and 256-token blocks) and whole
    kernel (GQA group of 4 in 16 rows, head_dim 128, static cache), for 4 and 8 warps per program, with the
    shared-memory, barrier and MMA instructions among them."""
    from p3quant.kernels import decode_attention as attention

    shape = dict(G=4, GP=16, G4=4, D8=16, DW=16, USE_ASM=True, BLOCK_R=16, DEVICE_LEN=True, PDL=False)
    scores_types = (["*bf16", "*fp32", "*i32", "*fp16", "*u8", "*fp16", "*bf16", "*u8"] + ["*fp32"] * 4
                    + ["*i64", "i32", "i32", "i32", "fp32", "fp32", "i32", "i32"] + ["i32"] * 22)
    pv_types = ["*i32", "*fp16", "*u8", "*bf16"] + ["*fp32"] * 5 + ["*i64"] + ["i32"] * 19
    for block_t, warps in ((128, 4), (128, 8), (256, 4), (256, 8)):
        for name, fn, types, extra in (("scores", attention._scores_kernel, scores_types,
                                        dict(HAS_SMOOTH=True, QUANT_Q=True, HAS_MASK=False, HAS_SOFTCAP=False,
                                             NATIVE_E4M3=True)),
                                       ("P.V", attention._pv_kernel, pv_types, dict(SP=64, HALF_UP=False))):
            cubin = compile_sm90(fn, types, dict(shape, BLOCK_T=block_t, **extra), num_warps=warps).asm["cubin"]
            ops = loop_opcodes(cubin)
            print(f"{name}, {block_t}-token blocks, {warps} warps: {sum(ops.values())} instructions in the block loop, "
                  f"{total_instructions(cubin)} in all, {registers(cubin)} registers per thread; "
                  + ", ".join(f"{o} {n}" for o, n in ops.most_common(4)) + "; "
                  + ", ".join(f"{o} {ops.get(o, 0)}" for o in ("STS", "LDS", "LDSM", "BAR", "HMMA", "HGMMA")))


def small_m_counts() -> None:
    """The small-M kernel's K-step loop (BLOCK_N 64, M 16, groups of 128, BitMoD, its shipped warps and stages) in
    each operand variant: instructions, registers and the shared-memory / barrier / MMA instructions per step."""
    from p3quant.kernels import w4_mma

    types = ["*fp16", "*fp32", "*i32", "*fp16", "*u8", "*bf16", "*bf16", "*fp32"] + ["i32"] * 9
    _, warps, stages = w4_mma.MMA_CONFIG
    for name, x_type, fp8, quarters in (("W4A8 halves", "*fp16", False, False),
                                        ("W4A8 quarters", "*fp16", False, True), ("W4A8 fp8 (default)", "*fp8e4nv", True, False),
                                        ("W4A16 bf16 halves", "*bf16", False, False),
                                        ("W4A16 bf16 quarters", "*bf16", False, True)):
        bf16 = x_type == "*bf16"
        cubin = compile_sm90(
            w4_mma._w4_mma_kernel, [x_type] + types[1:],
            dict(GROUP=128, BLOCK_N=64, BLOCK_M=16, SPLIT_K=1, IS_BITMOD=True, HAS_BIAS=False, USE_ASM=True,
                 ROW_SCALE=not bf16, BF16=bf16, NATIVE_BF16=True, FP8=fp8, QUARTERS=quarters, PDL=False),
            divisible=("K", "stride_xm", "stride_ww", "stride_ym"), num_warps=warps, num_stages=stages).asm["cubin"]
        ops = loop_opcodes(cubin)
        print(f"small-M {name}: {sum(ops.values())} loop instructions, {registers(cubin)} registers; "
              + ", ".join(f"{o} {ops.get(o, 0)}" for o in ("STS", "LDS", "LDSM", "BAR", "HGMMA", "QGMMA")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=None,
                        help="launch configs 'BLOCK_N,BLOCK_K,warps;...' (default: the one gemm_w4 uses)")
    parser.add_argument("--segments", type=int, default=1, help="weights per launch, as for q/k/v (1 to 3)")
    parser.add_argument("--pdl", action="store_true", help="compile the programmatic-dependent-launch variant")
    parser.add_argument("--attention", action="store_true", help="count the decode-attention passes instead")
    parser.add_argument("--conversions", action="store_true", help="count the prefill's weight conversions instead")
    parser.add_argument("--small-m", action="store_true", help="count the small-M kernel's operand variants instead")
    args = parser.parse_args()
    if args.small_m:
        small_m_counts()
        return
    if args.attention:
        attention_counts()
        return
    if args.conversions:
        conversion_counts()
        return
    configs = [gemm_w4._gemv_config()]
    if args.configs:
        configs = [tuple(int(v) for v in c.split(",")) + (1,) for c in args.configs.split(";")]
    group = 128
    for block_n, block_k, warps, stages in configs:
        words_per_thread = block_n * block_k // 8 // (32 * warps)
        print(f"M = 1 GEMV, config {(block_n, block_k, warps, stages)}, group {group}, {args.segments} segment(s), PDL "
              f"{'on' if args.pdl else 'off'}: {words_per_thread} words per thread per loop step")
        for is_bitmod in (True, False):
            kernel = compile_sm90(
                gemm_w4._w4_gemv_kernel, gemm_w4.GEMV_ARG_TYPES,
                dict(KW=4096 // 8, SEGMENTS=args.segments, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k,
                     IS_BITMOD=is_bitmod, HAS_BIAS=False, USE_ASM=True, EVEN_K=True, PDL=args.pdl),
                divisible=("K", "stride_xm", "stride_wn"), num_warps=warps, num_stages=stages)
            ops = loop_opcodes(kernel.asm["cubin"])
            total = sum(ops.values())
            print(f"{'BitMoD' if is_bitmod else 'INT4'}: {total} loop instructions, {total / words_per_thread:.1f} per word, "
                  f"{registers(kernel.asm['cubin'])} registers per thread; " + ", ".join(f"{o} {n}" for o, n in ops.most_common(10)))


if __name__ == "__main__":
    main()
