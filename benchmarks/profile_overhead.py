"""Split a kernel call's time into GPU time (CUDA-graph replay) and host overhead (eager do_bench), and show
where the GPU KV append differs from the torch quantizers, if anywhere.

Run: python benchmarks/profile_overhead.py
"""

from __future__ import annotations

import torch
import triton

from p3quant.formats import BITMOD4
from p3quant.kernels.gemm_w4 import w4_matmul
from p3quant.kernels.kv_append import append_kv, key_smoothing_factor_gpu
from p3quant.quantizers import key_smoothing_factor, quantize_keys, quantize_values

from p3quant.kernels import act_quant  # noqa: E402

act_quant.ACTIVATION_REUSE = False  # each call times one linear layer, its own activation quantization included


def graph_us(fn) -> float:
    """Median microseconds of fn replayed from a CUDA graph (no host launch cost)."""
    fn()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(10):
                fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median") * 1e3 / 10


def main() -> None:
    k = torch.randn(2, 8, 999, 128, device="cuda", dtype=torch.bfloat16) * (1 + 3 * torch.rand(128, device="cuda"))
    s_ref, s_gpu = key_smoothing_factor(k), key_smoothing_factor_gpu(k)
    print("smoothing equal:", torch.equal(s_ref, s_gpu))
    b, h, t, d = k.shape
    kp, vp = (torch.empty(b, h, t, d // 2, dtype=torch.uint8, device="cuda") for _ in range(2))
    ks, vs = (torch.empty(b, h, t, 1, dtype=torch.float16, device="cuda") for _ in range(2))
    kz, vz = (torch.empty(b, h, t, 1, dtype=torch.uint8, device="cuda") for _ in range(2))
    append_kv(k, k, s_ref, kp, ks, kz, vp, vs, vz)
    for name, got, ref in (("keys", (kp, ks, kz), quantize_keys(k, s_ref)), ("values", (vp, vs, vz), quantize_values(k))):
        codes = lambda p: torch.stack((p & 15, p >> 4), -1).flatten(-2).int()  # noqa: E731
        dc = (codes(got[0]) - codes(ref.packed)).abs()
        print(f"{name}: packed mismatches {(got[0] != ref.packed).sum().item()} (max code diff {dc.max().item()}), "
              f"scales {(got[1] != ref.scales).sum().item()} (max rel {((got[1].float() - ref.scales.float()).abs() / ref.scales.float()).max().item():.2e}), "
              f"zeros {(got[2] != ref.zeros).sum().item()} of {ref.zeros.numel()} rows")
    for n, kk, m in ((4096, 4096, 1), (4096, 4096, 16), (28672, 4096, 1), (4096, 4096, 1024)):
        w = BITMOD4.quantize(torch.randn(n, kk, device="cuda"), 128)
        x = torch.randn(m, kk, device="cuda", dtype=torch.bfloat16)
        for afmt in ("fp8_e4m3", "none"):
            fn = lambda: w4_matmul(x, w, None, afmt)  # noqa: E731
            eager = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e3
            print(f"gemm {n}x{kk} M={m} {afmt}: eager {eager:.1f} us, graph {graph_us(fn):.1f} us")


if __name__ == "__main__":
    main()
