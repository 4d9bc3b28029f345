"""Command-level PIM sequencer: emits the all-bank command stream of a GEMV and times it.

Per channel, all-bank PIM commands drive every PCU in lock-step, so the stream of the busiest
channel sets the operation's time (channels run in parallel).  For each pass over the weights,
each output tile and each DRAM row of the tile the sequencer issues:
  WR_IN   input slice of the row, over the channel's external bus, into the PCUs' single input
          buffer (free once the previous row's last MAC step has consumed it);
  ACT     all-bank activate, >= tRP after the previous PRE;
  MAC x n all-bank column MAC commands, the first >= tRCD after ACT and after WR_IN completes,
          then one per column interval (tCCD_L, or longer when the PEs need several steps);
  PRE     >= tRTP after the last MAC and >= tRAS after ACT;
and after each tile RD_OUT, the results over the bus, once the last MAC step has finished.  The
PE accumulators are single-buffered, so a tile's first MAC waits for the previous tile's RD_OUT.

The MACs of one row form an arithmetic progression with no other constraint, so a row is timed
in O(1) (a trace, when requested, expands them).  Differences from the closed form (timing.py):
  * RD_OUT overlaps the next tile's PRE/ACT window instead of adding to it (slightly faster);
  * PRE waits max(tRTP after the last MAC, tRAS after ACT) instead of a fixed tRCD + tRP per row:
    rows with few columns (short reductions, e.g. Q.K^T with head_dim 128) pay for tRAS, and a
    multi-step column's extra steps overlap the precharge (Pimba's 2-step columns);
  * a partial last row costs only its own columns in both models, but its tRAS floor shows here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .dram import DramSpec
from .pim_unit import PcuSpec
from .timing import PimTiming, ceil_div, column_cycles, gemv_layout, input_write_cycles, readout_cycles


@dataclass
class CommandTrace:
    """Optional record of issued commands: (cycle, command, detail)."""

    events: list[tuple[float, str, str]] = field(default_factory=list)

    def add(self, cycle: float, command: str, detail: str = "") -> None:
        self.events.append((cycle, command, detail))


@dataclass
class _Channel:
    """Timing state of one channel's command stream."""

    bus_free: float = 0.0
    pre_done: float = 0.0  # earliest next ACT (previous PRE + tRP)
    buffer_free: float = 0.0  # input buffer consumed by the previous row
    acc_free: float = 0.0  # accumulators read out
    last_mac_done: float = 0.0
    stall: float = 0.0
    readout_wait: float = 0.0
    commands: Counter = field(default_factory=Counter)


def command_gemv(dram: DramSpec, pcu: PcuSpec, *, cout: int, cin: int, n_inputs: int, weight_bits: int,
                 input_bits: int, channels: int | None = None, trace: CommandTrace | None = None,
                 counts: Counter | None = None) -> PimTiming:
    """Sequence and time one GEMV; same signature and result type as timing.pim_gemv.

    `trace` receives the busiest channel's commands; `counts` is updated with the commands of all
    channels used (WR_IN / RD_OUT counted in column-sized bus bursts).
    """
    layout = gemv_layout(dram, pcu, cout=cout, cin=cin, n_inputs=n_inputs, weight_bits=weight_bits,
                         input_bits=input_bits, channels=channels or dram.total_channels)
    ch = _Channel()
    rows = layout.row_columns()
    tile_outputs = layout.tile_outputs_per_channel()
    mac_busy = 0.0
    for inputs in layout.pass_inputs():
        col = column_cycles(dram, pcu, weight_bits, inputs)
        for outputs in tile_outputs:
            for ncols in rows:
                # Input slice over the bus into the (single) input buffer.
                w_start = max(ch.bus_free, ch.buffer_free)
                w_done = w_start + input_write_cycles(dram, layout, ncols, inputs)
                ch.bus_free = w_done
                act = ch.pre_done
                act_ready = act + dram.tRCD
                first = max(act_ready, w_done, ch.acc_free)
                ch.stall += max(0.0, w_done - act_ready)
                ch.readout_wait += max(0.0, ch.acc_free - max(act_ready, w_done))
                last = first + (ncols - 1) * col
                pre = max(last + dram.tRTP, act + dram.tRAS)
                ch.pre_done = pre + dram.tRP
                ch.buffer_free = ch.last_mac_done = last + col
                mac_busy += ncols * col
                ch.commands.update({"WR_IN": ceil_div(ncols * layout.operands_per_pe_per_column * input_bits * inputs,
                                                      dram.column_bits),
                                    "ACT": 1, "MAC": ncols, "PRE": 1})
                if trace is not None:
                    trace.add(w_start, "WR_IN", f"until {w_done}")
                    trace.add(act, "ACT")
                    for k in range(ncols):
                        trace.add(first + k * col, "MAC")
                    trace.add(pre, "PRE")
            # Results of the tile over the bus once the last step has finished.
            r_start = max(ch.bus_free, ch.last_mac_done)
            ch.bus_free = ch.acc_free = r_start + readout_cycles(dram, pcu, outputs, inputs)
            ch.commands["RD_OUT"] += ceil_div(outputs * inputs * pcu.result_bits, dram.column_bits)
            if trace is not None:
                trace.add(r_start, "RD_OUT", f"until {ch.acc_free}")
    end = ch.acc_free
    readout = ch.readout_wait + (end - ch.last_mac_done)
    n = layout.channels
    if counts is not None:
        counts.update({k: v * n for k, v in ch.commands.items()})
    bus_bits = (layout.tiles * layout.columns_per_tile * layout.operands_per_pe_per_column * input_bits
                * n_inputs * n + cout * n_inputs * pcu.result_bits)
    return PimTiming(
        cycles=end, act_pre_cycles=end - mac_busy - ch.stall - readout, mac_cycles=mac_busy,
        input_stall_cycles=ch.stall, readout_cycles=readout, activations=ch.commands["ACT"] * n,
        column_commands=ch.commands["MAC"] * n, internal_bits=float(layout.passes) * cout * cin * weight_bits,
        bus_bits=float(bus_bits), macs=float(n_inputs) * cout * cin, channels_used=n,
    )

