"""Offline evaluation text: where the shared data folder is, and WikiText-2 joined as the standard protocol does."""

from __future__ import annotations

import os
from pathlib import Path

WIKITEXT2_TEST = Path("wikitext-2-raw") / "wiki.test.raw"


def data_dir() -> Path:
    """$P3QUANT_DATA, else the first existing `../shared/data` beside the source checkout or the cwd.

    Returns the checkout-relative candidate when none exists, so error messages name a concrete path.
    """
    env = os.environ.get("P3QUANT_DATA")
    if env:
        return Path(env).expanduser()
    candidates = [
        Path(__file__).resolve().parent.parent.parent / "shared" / "data",  # <repo>/../shared/data
        Path.cwd().parent / "shared" / "data",
    ]
    return next((path for path in candidates if path.is_dir()), candidates[0])


def wikitext2_test_text(path: str | os.PathLike | None = None) -> str:
    """The WikiText-2 raw test split as one string: "\\n\\n".join of its lines, each line keeping its "\\n".

    That is what `"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])` does with the
    dataset's rows. The file may have CRLF line endings; they are normalised to "\\n" before splitting. The shared
    copy holds only the 2891 non-empty lines (the Hugging Face split also has 1467 empty rows), so its token count is
    slightly smaller than the usual one and perplexities are close to, not identical with, published numbers.
    """
    file = Path(path) if path is not None else data_dir() / WIKITEXT2_TEST
    if not file.is_file():
        raise FileNotFoundError(
            f"WikiText-2 test file not found at {file}; pass path=... or set P3QUANT_DATA to the folder that "
            f"contains {WIKITEXT2_TEST}"
        )
    lines = file.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    if lines[-1] == "":  # the file ends with a newline
        lines.pop()
    # Like the dataset's rows: a text line keeps its newline, a blank line becomes "".
    return "\n\n".join(line + "\n" if line.strip() else "" for line in lines)
