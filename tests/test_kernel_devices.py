"""Every kernel wrapper that launches on the GPU makes its input's device current first (common.on_input_device):
Triton launches on the current device, so a layer placed on cuda:1 by accelerate's device_map would otherwise be
computed by kernels running on cuda:0 (gpu_check.check_second_gpu runs them on two GPUs)."""

import pytest

from p3quant.kernels import act_quant, argmax, common, decode_attention, dequant_w4, gemm_w4, kv_append, rmsnorm, rope, silu_mul

ENTRY_POINTS = [
    decode_attention.p3_decode_attention, gemm_w4.w4_matmul, gemm_w4.w4_matmul_shared_input, dequant_w4.dequantize_w4,
    dequant_w4.weight_values_fp8, act_quant.quantize_activation_fp8, act_quant.quantize_activation_fp8_split,
    act_quant.quantize_activation_fp8_halves, act_quant.split_16bit, rmsnorm.rms_norm, silu_mul.silu_mul,
    rope.apply_rotary, kv_append.append_kv, kv_append.append_kv_at, kv_append.quantize_int4_rows_into,
    kv_append.key_smoothing_factor_gpu, argmax.argmax_tokens,
]
_GUARD = common.on_input_device(lambda: None).__code__


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda fn: fn.__name__)
def test_kernel_wrapper_runs_on_its_inputs_device(fn):
    assert fn.__code__ is _GUARD and callable(getattr(fn, "__wrapped__", None)), f"{fn.__name__} lacks on_input_device"
