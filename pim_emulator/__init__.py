"""PIM emulator of p3quant (installed as p3quant.pim_emulator)."""
