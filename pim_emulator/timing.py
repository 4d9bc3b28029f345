"""The paper's closed-form PIM timing model (P3LLM.md 4.5): the fast path of the emulator.

A GEMV of a [cout, cin] weight for `n_inputs` input vectors on all-bank PIM:
  * outputs are spread over every PE of the channels it uses (channels x PCUs x PEs); each PE
    owns one output of an output tile, so the tile count is ceil(cout / PEs);
  * for each tile the reduction dimension is walked one DRAM row at a time; per row the
    activate + precharge (tRCD + tRP) overlaps with writing the row's input slice into the PCU
    registers over the channel's external bus, and each column access is one PE step
    (tCCD_L; a TEP unit steps every tCCD_S and serves two inputs per fetched slice, but the column
    still arrives once per tCCD_L);
  * the tile's 32-bit results are then read out over the external bus;
  * input vectors beyond the unit's reuse factor repeat the whole weight stream (a "pass").
Attention runs one independent GEMV per (sequence, kv-head) "unit", each on one channel; the
query heads of a GQA group are the unit's input vectors.  Units beyond the channel count queue up
in waves.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .dram import DramSpec
from .pim_unit import PcuSpec


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PimTiming:
    """Time and traffic of one PIM operation (cycles are memory cycles of the DRAM clock)."""

    cycles: float
    act_pre_cycles: float  # exposed row activate + precharge
    mac_cycles: float  # column accesses / PE steps
    input_stall_cycles: float  # input writes not hidden behind activate + precharge
    readout_cycles: float
    activations: int  # all-bank ACT commands, summed over the channels used
    column_commands: int  # all-bank MAC column commands, summed over the channels used
    internal_bits: float  # bits read from banks into PCUs
    bus_bits: float  # bits over the external bus (input writes + result read-out)
    macs: float
    channels_used: int

    def scaled(self, factor: int) -> "PimTiming":
        """The same operation repeated `factor` times back to back."""
        return PimTiming(**{f.name: (getattr(self, f.name) if f.name == "channels_used"
                                     else getattr(self, f.name) * factor) for f in fields(self)})


@dataclass(frozen=True)
class GemvLayout:
    """How one GEMV is laid out on the PCUs of `channels` channels (shared by both timing models)."""

    cout: int
    cin: int
    n_inputs: int
    weight_bits: int
    input_bits: int
    channels: int
    pcus_per_channel: int
    pe_count: int
    operands_per_pe_per_column: int
    columns_per_tile: int
    columns_per_row: int
    tiles: int
    passes: int
    inputs_per_fetch: int

    @property
    def pes(self) -> int:
        return self.channels * self.pcus_per_channel * self.pe_count

    @property
    def rows_per_tile(self) -> int:
        return ceil_div(self.columns_per_tile, self.columns_per_row)

    def row_columns(self) -> list[int]:
        """Column accesses of each row of one tile (the last row may be partial)."""
        full, rest = divmod(self.columns_per_tile, self.columns_per_row)
        return [self.columns_per_row] * full + ([rest] if rest else [])

    def pass_inputs(self) -> list[int]:
        """Input vectors served by each pass over the weights."""
        full, rest = divmod(self.n_inputs, self.inputs_per_fetch)
        return [self.inputs_per_fetch] * full + ([rest] if rest else [])

    def tile_outputs_per_channel(self) -> list[int]:
        """Outputs held by the busiest channel in each output tile."""
        out = []
        for t in range(self.tiles):
            in_tile = min(self.pes, self.cout - t * self.pes)
            out.append(min(self.pcus_per_channel * self.pe_count, ceil_div(in_tile, self.channels)))
        return out


def gemv_layout(dram: DramSpec, pcu: PcuSpec, *, cout: int, cin: int, n_inputs: int, weight_bits: int,
                input_bits: int, channels: int) -> GemvLayout:
    """Lay a [cout, cin] weight over `channels` channels of `dram` with `pcu` units."""
    if min(cout, cin, n_inputs, channels) <= 0:
        raise ValueError(f"GEMV needs positive sizes, got cout={cout} cin={cin} n_inputs={n_inputs} "
                         f"channels={channels}")
    if channels > dram.total_channels:
        raise ValueError(f"{channels} channels requested but {dram.name} has {dram.total_channels}")
    pcu.check_operands(weight_bits, input_bits)
    pcus_per_channel = dram.banks_per_channel // pcu.banks_per_pcu
    per_pe = dram.column_bits // weight_bits // pcu.pe_count
    if per_pe < 1:
        raise ValueError(f"a {dram.column_bits}-bit column holds fewer {weight_bits}-bit operands than "
                         f"{pcu.name} has PEs")
    pes = channels * pcus_per_channel * pcu.pe_count
    return GemvLayout(
        cout=cout, cin=cin, n_inputs=n_inputs, weight_bits=weight_bits, input_bits=input_bits,
        channels=channels, pcus_per_channel=pcus_per_channel, pe_count=pcu.pe_count,
        operands_per_pe_per_column=per_pe, columns_per_tile=ceil_div(cin, per_pe),
        columns_per_row=dram.columns_per_row, tiles=ceil_div(cout, pes),
        passes=ceil_div(n_inputs, pcu.inputs_per_fetch), inputs_per_fetch=pcu.inputs_per_fetch,
    )


def column_cycles(dram: DramSpec, pcu: PcuSpec, weight_bits: int, inputs: int) -> float:
    """Time of one column access serving `inputs` vectors: DRAM-bound at tCCD_L or PE-bound."""
    steps = pcu.steps_per_column(dram.column_bits, weight_bits) * inputs
    return max(dram.tCCD_L, steps * dram.tCCD_L / pcu.clock_multiplier)


def input_write_cycles(dram: DramSpec, layout: GemvLayout, columns: int, inputs: int) -> int:
    """Bus cycles to broadcast one row's input slice (for `inputs` vectors) to a channel's PCUs."""
    bits = columns * layout.operands_per_pe_per_column * layout.input_bits * inputs
    return ceil_div(bits, dram.bus_bits_per_cycle)


def readout_cycles(dram: DramSpec, pcu: PcuSpec, outputs: int, inputs: int) -> int:
    return ceil_div(outputs * inputs * pcu.result_bits, dram.bus_bits_per_cycle)


def pim_gemv(dram: DramSpec, pcu: PcuSpec, *, cout: int, cin: int, n_inputs: int, weight_bits: int,
             input_bits: int, channels: int | None = None) -> PimTiming:
    """Closed-form time of one GEMV spread over `channels` channels (default: all of them)."""
    layout = gemv_layout(dram, pcu, cout=cout, cin=cin, n_inputs=n_inputs, weight_bits=weight_bits,
                         input_bits=input_bits, channels=channels or dram.total_channels)
    act_pre = dram.tRCD + dram.tRP
    rows = layout.row_columns()
    act = mac = stall = readout = 0.0
    for inputs in layout.pass_inputs():
        col = column_cycles(dram, pcu, weight_bits, inputs)
        per_tile_stall = sum(max(0, input_write_cycles(dram, layout, c, inputs) - act_pre) for c in rows)
        act += layout.tiles * len(rows) * act_pre
        mac += layout.tiles * layout.columns_per_tile * col
        stall += layout.tiles * per_tile_stall
        readout += sum(readout_cycles(dram, pcu, o, inputs) for o in layout.tile_outputs_per_channel())
    n_act = layout.passes * layout.tiles * len(rows) * layout.channels
    n_col = layout.passes * layout.tiles * layout.columns_per_tile * layout.channels
    bus_bits = (layout.tiles * layout.columns_per_tile * layout.operands_per_pe_per_column * input_bits
                * n_inputs * layout.channels + cout * n_inputs * pcu.result_bits)
    return PimTiming(
        cycles=act + mac + stall + readout, act_pre_cycles=act, mac_cycles=mac, input_stall_cycles=stall,
        readout_cycles=readout, activations=n_act, column_commands=n_col,
        internal_bits=float(layout.passes) * cout * cin * weight_bits, bus_bits=float(bus_bits),
        macs=float(n_inputs) * cout * cin, channels_used=layout.channels,
    )


def pim_attention(dram: DramSpec, pcu: PcuSpec, *, units: int, cout: int, cin: int, n_inputs: int,
                  weight_bits: int, input_bits: int, gemv=pim_gemv) -> PimTiming:
    """`units` independent GEMVs (one per sequence x kv-head), one channel each, in waves.

    `gemv` is the single-GEMV model to use (closed form by default; the command-level model
    passes its own), so both models share this mapping.
    """
    one = gemv(dram, pcu, cout=cout, cin=cin, n_inputs=n_inputs, weight_bits=weight_bits,
               input_bits=input_bits, channels=1)
    waves = ceil_div(units, dram.total_channels)
    busy = min(units, dram.total_channels)
    per_wave = PimTiming(
        cycles=one.cycles, act_pre_cycles=one.act_pre_cycles, mac_cycles=one.mac_cycles,
        input_stall_cycles=one.input_stall_cycles, readout_cycles=one.readout_cycles,
        activations=one.activations * busy, column_commands=one.column_commands * busy,
        internal_bits=one.internal_bits * busy, bus_bits=one.bus_bits * busy, macs=one.macs * busy,
        channels_used=busy,
    )
    total = per_wave.scaled(waves)
    # The last wave may be partial: traffic and work follow the real unit count.
    ratio = units / (busy * waves)
    return PimTiming(
        cycles=total.cycles, act_pre_cycles=total.act_pre_cycles, mac_cycles=total.mac_cycles,
        input_stall_cycles=total.input_stall_cycles, readout_cycles=total.readout_cycles,
        activations=round(total.activations * ratio), column_commands=round(total.column_commands * ratio),
        internal_bits=total.internal_bits * ratio, bus_bits=total.bus_bits * ratio, macs=total.macs * ratio,
        channels_used=busy,
    )


def peak_internal_bits_per_cycle(dram: DramSpec, pcu: PcuSpec, channels: int) -> float:
    """Upper bound on bank-to-PCU bandwidth: one column per PCU per tCCD_L."""
    return channels * (dram.banks_per_channel // pcu.banks_per_pcu) * dram.column_bits / dram.tCCD_L
