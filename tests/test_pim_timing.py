"""Timing invariants of the closed-form and command-level PIM models, NPU bounds, DRAM presets."""

from collections import Counter

import pytest

from p3quant.pim_emulator.command_model import CommandTrace, command_gemv
from p3quant.pim_emulator.dram import DRAM_PRESETS, HBM2, get_dram
from p3quant.pim_emulator.npu import NpuSpec, npu_op
from p3quant.pim_emulator.pim_unit import HBM_PIM_FP16, P3_PCU, P3_PCU_TEP, PIMBA_SPU
from p3quant.pim_emulator.timing import peak_internal_bits_per_cycle, pim_attention, pim_gemv

W4A8 = dict(weight_bits=4, input_bits=8)
REGULAR = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096), (128, 4096)]


def test_paper_peak_ratios():
    # P3 PCU: 4x the MACs of an FP16 unit; with TEP twice the step rate: 8x peak.
    assert P3_PCU.macs_per_step == 4 * HBM_PIM_FP16.macs_per_step
    assert P3_PCU_TEP.macs_per_step * P3_PCU_TEP.clock_multiplier == 8 * HBM_PIM_FP16.macs_per_step
    # internal bandwidth = 4x external (one 256-bit column per PCU per tCCD_L, 8 PCUs per channel)
    assert peak_internal_bits_per_cycle(HBM2, HBM_PIM_FP16, 16) == 4 * 16 * HBM2.bus_bits_per_cycle
    assert HBM2.external_bandwidth_Bps == pytest.approx(256e9)


def test_paper_worked_example():
    # 4096x4096 W4A8, batch 1, no TEP: 2 tiles x 32 rows x (28 + 32*4) + 2 x 32 readout cycles
    t = pim_gemv(HBM2, P3_PCU, cout=4096, cin=4096, n_inputs=1, **W4A8)
    assert t.cycles == 2 * (32 * (28 + 32 * 4) + 32)
    fp16 = pim_gemv(HBM2, HBM_PIM_FP16, cout=4096, cin=4096, n_inputs=1, weight_bits=16, input_bits=16)
    assert fp16.cycles == 2 * (128 * (28 + 32 * 4) + 32)


@pytest.mark.parametrize("pcu", [P3_PCU, P3_PCU_TEP])
def test_monotone_in_size(pcu):
    prev = 0.0
    for cin in (128, 512, 1024, 4096, 8192, 14336):
        c = pim_gemv(HBM2, pcu, cout=4096, cin=cin, n_inputs=2, **W4A8).cycles
        assert c > prev
        prev = c
    prev = 0.0
    for cout in (2048, 4096, 8192, 14336, 32000):
        c = pim_gemv(HBM2, pcu, cout=cout, cin=4096, n_inputs=2, **W4A8).cycles
        assert c > prev
        prev = c
    prev = 0.0
    for n in (1, 2, 3, 4, 8):
        c = pim_gemv(HBM2, pcu, cout=4096, cin=4096, n_inputs=n, **W4A8).cycles
        assert c >= prev
        prev = c


def test_tep_halves_mac_time():
    for n in (2, 4, 8):
        base = pim_gemv(HBM2, P3_PCU, cout=4096, cin=4096, n_inputs=n, **W4A8)
        tep = pim_gemv(HBM2, P3_PCU_TEP, cout=4096, cin=4096, n_inputs=n, **W4A8)
        assert tep.mac_cycles == base.mac_cycles / 2
        assert tep.activations == base.activations / 2
    # a single input cannot use the second slot: TEP gives nothing at batch 1
    one = [pim_gemv(HBM2, p, cout=4096, cin=4096, n_inputs=1, **W4A8).mac_cycles for p in (P3_PCU, P3_PCU_TEP)]
    assert one[0] == one[1]


@pytest.mark.parametrize("model", [pim_gemv, command_gemv])
@pytest.mark.parametrize("pcu,wb,ab", [(HBM_PIM_FP16, 16, 16), (P3_PCU, 4, 8), (P3_PCU_TEP, 4, 8), (PIMBA_SPU, 8, 8)])
def test_bandwidth_bounds_never_exceeded(model, pcu, wb, ab):
    for cout, cin in REGULAR:
        for n in (1, 2, 4):
            t = model(HBM2, pcu, cout=cout, cin=cin, n_inputs=n, weight_bits=wb, input_bits=ab)
            assert t.internal_bits / t.cycles <= peak_internal_bits_per_cycle(HBM2, pcu, t.channels_used)
            assert t.bus_bits / t.cycles <= t.channels_used * HBM2.bus_bits_per_cycle
            peak_macs = t.channels_used * 8 * pcu.macs_per_step * pcu.clock_multiplier / HBM2.tCCD_L
            assert t.macs / t.cycles <= peak_macs


@pytest.mark.parametrize("pcu,wb,ab", [(HBM_PIM_FP16, 16, 16), (P3_PCU, 4, 8), (P3_PCU_TEP, 4, 8), (PIMBA_SPU, 8, 8)])
def test_command_model_matches_closed_form_on_regular_gemvs(pcu, wb, ab):
    for cout, cin in REGULAR:
        for n in (1, 2, 4, 8):
            a = pim_gemv(HBM2, pcu, cout=cout, cin=cin, n_inputs=n, weight_bits=wb, input_bits=ab)
            b = command_gemv(HBM2, pcu, cout=cout, cin=cin, n_inputs=n, weight_bits=wb, input_bits=ab)
            assert b.cycles == pytest.approx(a.cycles, rel=0.02), (cout, cin, n)
            assert (b.activations, b.column_commands) == (a.activations, a.column_commands)


def test_command_model_short_rows_pay_tras_but_hide_readout():
    # Q.K^T of one (sequence, kv-head): 1 row per tile; readout overlaps PRE/ACT in the sequencer.
    a = pim_gemv(HBM2, P3_PCU, cout=4096, cin=128, n_inputs=4, channels=1, **W4A8)
    b = command_gemv(HBM2, P3_PCU, cout=4096, cin=128, n_inputs=4, channels=1, **W4A8)
    assert b.cycles < a.cycles
    assert b.cycles > a.cycles - a.readout_cycles


def test_command_trace_respects_dram_constraints():
    trace, counts = CommandTrace(), Counter()
    t = command_gemv(HBM2, P3_PCU_TEP, cout=4096, cin=1024, n_inputs=2, channels=1, trace=trace, counts=counts, **W4A8)
    ev = trace.events
    acts = [c for c, cmd, _ in ev if cmd == "ACT"]
    pres = [c for c, cmd, _ in ev if cmd == "PRE"]
    macs = [c for c, cmd, _ in ev if cmd == "MAC"]
    assert len(acts) == len(pres) == t.activations == counts["ACT"]
    assert len(macs) == t.column_commands == counts["MAC"]
    for a, p in zip(acts, pres):
        assert p - a >= HBM2.tRAS
    for p, a in zip(pres, acts[1:]):
        assert a - p >= HBM2.tRP
    assert all(m2 - m1 >= HBM2.tCCD_L for m1, m2 in zip(macs, macs[1:]))
    # each MAC lies inside an open row: >= tRCD after its ACT, before its PRE
    row = 0
    for m in macs:
        while row + 1 < len(acts) and m > pres[row]:
            row += 1
        assert acts[row] + HBM2.tRCD <= m <= pres[row]


def test_attention_waves_and_idle_channels():
    one_wave = pim_attention(HBM2, P3_PCU_TEP, units=8, cout=4096, cin=128, n_inputs=4, **W4A8)
    full = pim_attention(HBM2, P3_PCU_TEP, units=16, cout=4096, cin=128, n_inputs=4, **W4A8)
    two = pim_attention(HBM2, P3_PCU_TEP, units=17, cout=4096, cin=128, n_inputs=4, **W4A8)
    assert one_wave.cycles == full.cycles  # half the channels idle at 8 units
    assert full.macs == 2 * one_wave.macs
    assert two.cycles == 2 * full.cycles


def test_operand_checks_and_errors():
    with pytest.raises(ValueError, match="map this operation to the NPU"):
        pim_gemv(HBM2, P3_PCU, cout=64, cin=64, n_inputs=1, weight_bits=16, input_bits=16)
    with pytest.raises(ValueError, match="positive"):
        pim_gemv(HBM2, P3_PCU, cout=0, cin=64, n_inputs=1, **W4A8)
    with pytest.raises(ValueError, match="unknown DRAM"):
        get_dram("ddr9")


def test_npu_roofline():
    npu = NpuSpec()
    mem = npu_op(HBM2, npu, macs=4096 * 4096, dram_bytes=4096 * 4096 * 2)
    assert mem.cycles == mem.memory_cycles == 4096 * 4096 * 2 / 256
    comp = npu_op(HBM2, npu, macs=1e12, dram_bytes=1.0)
    assert comp.cycles == comp.compute_cycles == pytest.approx(1e12 / (4 * 128 * 128))
    with pytest.raises(ValueError):
        npu_op(HBM2, npu, dram_bytes=-1)


@pytest.mark.parametrize("name", sorted(DRAM_PRESETS))
def test_dram_presets_consistent(name):
    d = DRAM_PRESETS[name]
    assert d.tCCD_S < d.tCCD_L and d.tRAS >= d.tRCD and d.columns_per_row >= 16 and d.source
    t = pim_gemv(d, P3_PCU_TEP, cout=4096, cin=4096, n_inputs=2, **W4A8)
    assert t.internal_bits / t.cycles <= peak_internal_bits_per_cycle(d, P3_PCU_TEP, d.total_channels)
