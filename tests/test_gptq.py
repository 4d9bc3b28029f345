"""GPTQ: beats RTN on correlated inputs, lies exactly on the library's INT4 / BitMoD grid, clear errors, QuaRot+GPTQ
and P3 (BitMoD) + GPTQ run end to end."""

from __future__ import annotations

import pytest
import torch

from p3quant import P3Config, P3Linear
from p3quant.baselines import quarot_quantize
from p3quant.calibration.gptq import GPTQSettings, apply_gptq, gptq_quantize
from p3quant.formats.bitmod import BITMOD4
from p3quant.formats.integer import INT4
from p3quant.quantizers import quantize_weight
from test_baselines import VOCAB, _tiny_llama  # the shared tiny-model builder



def _correlated_inputs(tokens: int, features: int) -> torch.Tensor:
    """Random inputs with strongly correlated channels and uneven channel scales (never all zero)."""
    mix = torch.randn(features, features) / features**0.5 + torch.eye(features)
    low_rank = torch.randn(tokens, 8) @ torch.randn(8, features)
    x = (torch.randn(tokens, features) @ mix + 2 * low_rank) * (0.2 + torch.rand(features) * 2)
    assert x.abs().sum() > 0
    return x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.double().T @ x.double() / x.shape[0]


@pytest.mark.parametrize("group", [32, 128])
def test_gptq_reconstructs_outputs_better_than_rtn(group: int) -> None:
    x = _correlated_inputs(1024, 256)
    w = torch.randn(96, 256) * (0.5 + torch.rand(96, 1))
    q = gptq_quantize(w, _hessian(x), group).weight
    rtn = quantize_weight(w, "int4", group).dequantize()
    ref = x @ w.T
    err_gptq = (x @ q.T - ref).norm().item()
    err_rtn = (x @ rtn.T - ref).norm().item()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_weights_requantize_bit_identically(act_order: bool) -> None:
    cols, group = 192, 64
    x = _correlated_inputs(512, cols)
    x[:, 5] = 0  # a dead input: its weight column becomes 0
    w = torch.randn(48, cols) * torch.rand(48, 1)
    w[3] = 0  # an all-zero row
    w[4] = w[4].abs() + 0.1  # all-positive groups (zero point 0)
    w[5] = -w[5].abs() - 0.1  # all-negative groups (zero point 15)
    w[6] = w[6] * 1e-5  # tiny groups (scale at the fp16 floor)
    group = cols if act_order else group
    q = gptq_quantize(w, _hessian(x), group, GPTQSettings(act_order=act_order)).weight
    assert torch.isfinite(q).all() and (q[:, 5] == 0).all() and (q[3] == 0).all()
    packed = INT4.quantize(q, group)
    assert torch.equal(packed.dequantize(), q)  # the library quantizer reproduces GPTQ's grid values exactly
    assert torch.equal(INT4.quantize(packed.dequantize(), group).codes(), packed.codes())


def test_gptq_clear_errors() -> None:
    w, h = torch.randn(8, 96), torch.eye(96)
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(w, h, 64)
    with pytest.raises(ValueError, match="positive even"):
        gptq_quantize(w, h, 0)
    with pytest.raises(ValueError, match="positive even"):
        gptq_quantize(w, h, 3)
    with pytest.raises(ValueError, match="act_order"):
        gptq_quantize(w, h, 32, GPTQSettings(act_order=True))
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(w, torch.eye(64), 32)
    model = _tiny_llama(tied=False)
    with pytest.raises(ValueError, match="BitMoD"):
        apply_gptq(model, P3Config.preset("w4a8kv4p8", weight_group_size=32, weight_format="int4_sym"),
                   [torch.randint(0, VOCAB, (64,))])
    with pytest.raises(ValueError, match="weight_format"):
        gptq_quantize(w, h, 32, weight_format="int4_sym")
    with pytest.raises(ValueError, match="does not divide"):
        apply_gptq(model, P3Config.preset("int4-w4a8kv4", weight_group_size=64), [torch.randint(0, VOCAB, (64,))])
    with pytest.raises(ValueError, match="calibration"):
        quarot_quantize(_tiny_llama(tied=False), P3Config.preset("int4-w4a8kv4", weight_group_size=32), weights="gptq")
    with pytest.raises(ValueError, match="weights="):
        quarot_quantize(_tiny_llama(tied=False), P3Config.preset("int4-w4a8kv4", weight_group_size=32), weights="awq")


def test_quarot_gptq_end_to_end_keeps_gptq_codes(monkeypatch) -> None:
    config = P3Config.preset("int4-w4a8kv4", weight_group_size=32, calibration_samples=4, calibration_seqlen=48)
    calibration = [torch.randint(0, VOCAB, (4 * 48,))]
    model = _tiny_llama(tied=False)
    captured = {}
    from p3quant.calibration import gptq

    original = gptq.apply_gptq

    def spy(m, *args, **kwargs):
        losses = original(m, *args, **kwargs)
        captured.update({n: mod.weight.detach().clone() for n, mod in m.named_modules() if type(mod) is torch.nn.Linear})
        return losses

    monkeypatch.setattr(gptq, "apply_gptq", spy)
    quarot_quantize(model, config, weights="gptq", calibration=calibration)
    assert model.config._attn_implementation == "p3_quarot"
    packed = {n: m for n, m in model.named_modules() if isinstance(m, P3Linear)}
    assert len(packed) == 14 and set(packed) <= set(captured)
    for name, module in packed.items():  # packing kept GPTQ's codes: the P3Linear weights are GPTQ's, exactly
        assert torch.equal(module.weight, captured[name]), name
    ids = torch.randint(0, VOCAB, (1, 24))
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(logits).all() and generated.shape == (1, 27)


# ------------------------------------------------------------------------------------------- BitMoD
def test_bitmod_gptq_reconstructs_outputs_better_than_rtn() -> None:
    """GPTQ's output error is about 0.25-0.3x BitMoD RTN's on these inputs (8 seeds); 0.5 leaves a wide margin."""
    group = 32
    x = _correlated_inputs(1024, 256)
    w = torch.randn(96, 256) * (0.5 + torch.rand(96, 1))
    q = gptq_quantize(w, _hessian(x), group, weight_format="bitmod").weight
    rtn = quantize_weight(w, "bitmod", group).dequantize()
    ref = x @ w.T
    err_gptq = (x @ q.T - ref).norm().item()
    err_rtn = (x @ rtn.T - ref).norm().item()
    assert err_gptq < 0.5 * err_rtn, (err_gptq, err_rtn)


def test_bitmod_gptq_with_identity_hessian_is_the_library_rtn() -> None:
    """No error feedback (H = I): every group's variant, scale and codes are BITMOD4.quantize's (anchors included)."""
    w = torch.randn(128, 128) * torch.rand(128, 1)
    w[:16] *= 1e-4  # scales at or near the fp16 floor
    w[16:32] = torch.randint(-8, 9, (16, 128)).float() / 8  # many exact ties between grid values
    result = gptq_quantize(w, torch.eye(128), 32, weight_format="bitmod")
    rtn = BITMOD4.quantize(w, 32)
    assert torch.equal(result.weight, rtn.dequantize())
    assert torch.equal(result.scales, rtn.scales)


def _edge_case_weights(rows: int, cols: int, kind: int) -> torch.Tensor:
    w = torch.randn(rows, cols)
    if kind == 1:
        w = w * torch.rand(rows, 1) * 1e-3  # scales near the fp16 floor (6.1e-5) for one or both families
    elif kind == 2:
        w = torch.randint(-8, 9, (rows, cols)).float() * 0.01  # grid-like values, ties, equal +- maxima
    elif kind == 3:
        w = w.sign() * torch.rand(rows, cols) ** 0.1  # many elements near +-max: the +-8 variants win often
    elif kind == 4:  # exact grid multiples at random powers of two: every variant and exact MSE ties
        mult = torch.tensor([1.0, 0.5, 0.75, 1.5, 2.0, 3.0])[torch.randint(0, 6, (rows, cols))]
        w = torch.randint(-4, 5, (rows, cols)).float() * mult * 2.0 ** torch.randint(-20, 1, (rows, 1)).float()
    w[0] = 0  # all-zero row
    w[1] = w[1].abs()  # one-signed groups
    w[2] = -w[2].abs()
    w[3, : cols // 2] = 0
    return w


def test_bitmod_gptq_weights_requantize_bit_identically() -> None:
    """BITMOD4.quantize of GPTQ's output reproduces its values, scales and selectors exactly, on random and edge-case
    groups (fp16-floor scales, ties, equal +- maxima, one-signed, zero and dead columns, every variant)."""
    seen = torch.zeros(4, dtype=torch.long)
    for trial, (cols, group, act_order) in enumerate([(128, 32, False), (96, 32, False), (64, 64, True), (64, 16, False)]):
        x = _correlated_inputs(256, cols)
        if trial % 2:
            x[:, 3] = 0  # a dead input
        w = torch.cat([_edge_case_weights(16, cols, kind) for kind in range(5)])
        result = gptq_quantize(w, _hessian(x), group, GPTQSettings(act_order=act_order), weight_format="bitmod")
        packed = BITMOD4.quantize(result.weight, group)
        assert torch.isfinite(result.weight).all() and (result.weight[::16] == 0).all()
        assert torch.equal(packed.dequantize(), result.weight)
        assert torch.equal(packed.scales, result.scales) and torch.equal(packed.selectors, result.selectors)
        assert torch.equal(BITMOD4.quantize(packed.dequantize(), group).codes(), packed.codes())
        seen += torch.bincount(result.selectors.flatten().long(), minlength=4)
    assert (seen > 0).all(), seen  # all four variants exercised


def test_p3_gptq_method_end_to_end_keeps_gptq_codes(monkeypatch) -> None:
    """`w4a8kv4p8+gptq` through p3quant.eval.suite.build: GPTQ with BitMoD, no AWQ, packed weights equal GPTQ's."""
    import p3quant.calibration.awq as awq
    import p3quant.calibration.texts as texts
    import p3quant.models as models
    from p3quant.calibration import gptq
    from p3quant.eval import suite

    model = _tiny_llama(tied=False)
    monkeypatch.setattr(models, "load", lambda name: (model, None))
    monkeypatch.setattr(texts, "calibration_texts", lambda: [torch.randint(0, VOCAB, (512,))])
    monkeypatch.setattr(suite, "GPTQ_SAMPLES", 1)
    monkeypatch.setattr(awq, "apply_awq", lambda *a, **k: pytest.fail("AWQ must not run for +gptq"))
    captured = {}
    original = gptq.apply_gptq

    def spy(m, config, *args, **kwargs):
        assert config.weight_format == "bitmod" and config.calibration_samples == 1 and config.weight_group_size == 32
        losses = original(m, config, *args, **kwargs)
        captured.update({n: mod.weight.detach().clone() for n, mod in m.named_modules() if type(mod) is torch.nn.Linear})
        return losses

    monkeypatch.setattr(gptq, "apply_gptq", spy)
    built, _ = suite.build("tiny", "w4a8kv4p8+gptq", group_size=32)
    assert built is model and model.p3_config.weight_format == "bitmod"
    packed = {n: m for n, m in model.named_modules() if isinstance(m, P3Linear)}
    assert len(packed) == 14 and set(packed) <= set(captured)
    for name, module in packed.items():
        assert torch.equal(module.weight, captured[name]), name
    ids = torch.randint(0, VOCAB, (1, 24))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    with pytest.raises(ValueError, match="suffix"):
        suite.build("tiny", "w4a8kv4p8+foo", group_size=32)
