"""Default calibration text: the C4 validation subset in the data folder (never the WikiText-2 test split)."""

from __future__ import annotations

from ..data import data_dir

C4_SUBSET = "c4/c4_validation_2k.parquet"


def calibration_texts(documents: int = 500) -> list[str]:
    """The first `documents` C4 documents of the offline subset (enough for 16 x 512 tokens and more)."""
    import pyarrow.parquet as pq

    path = data_dir() / C4_SUBSET
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: set P3QUANT_DATA to the data folder, or pass calibration texts yourself")
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()[:documents]
