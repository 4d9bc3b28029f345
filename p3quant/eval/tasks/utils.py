"""Offline loaders for the p3_* lm-eval tasks: read the files under the data folder into DatasetDicts.

The folder is $P3QUANT_DATA if set, else p3quant.data.data_dir() (../shared/data beside the checkout).
Prompts and metrics in the YAML files are those of lm-eval's built-in tasks of the same name.
"""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

import datasets

from p3quant.data import WIKITEXT2_TEST, data_dir


def _file(relative: str | Path) -> Path:
    path = data_dir() / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: set P3QUANT_DATA to the folder holding the evaluation data")
    return path


def _jsonl(relative: str) -> list[dict]:
    return [json.loads(line) for line in _file(relative).read_text(encoding="utf-8").splitlines() if line.strip()]


def _split(name: str, rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows)})


def load_piqa(**kwargs) -> datasets.DatasetDict:
    rows = _jsonl("piqa/valid.jsonl")
    labels = _file("piqa/valid-labels.lst").read_text().split()
    if len(labels) != len(rows):
        raise ValueError(f"piqa: {len(rows)} questions but {len(labels)} labels")
    return _split("validation", [{**row, "label": int(label)} for row, label in zip(rows, labels)])


def load_arc_easy(**kwargs) -> datasets.DatasetDict:
    return _split("test", _jsonl("arc/ARC-Easy-test.jsonl"))


def load_arc_challenge(**kwargs) -> datasets.DatasetDict:
    return _split("test", _jsonl("arc/ARC-Challenge-test.jsonl"))


def load_lambada_openai(**kwargs) -> datasets.DatasetDict:
    return _split("test", _jsonl("lambada_openai/lambada_test.jsonl"))


def load_hellaswag(**kwargs) -> datasets.DatasetDict:
    """The derived text format: 6 lines per item (context, gold index, 4 endings); see data/README.md."""
    lines = bz2.decompress(_file("hellaswag/hellaswag_val_full.txt.bz2").read_bytes()).decode("utf-8").splitlines()
    if len(lines) % 6:
        raise ValueError(f"hellaswag: {len(lines)} lines is not a multiple of 6")
    rows = [
        {"query": _hellaswag_clean(lines[i]), "label": int(lines[i + 1]), "choices": [_hellaswag_clean(e) for e in lines[i + 2 : i + 6]]}
        for i in range(0, len(lines), 6)
    ]
    return _split("validation", rows)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag preprocess (the WikiHow tags are already gone from this file)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


_HEADING = re.compile(r"^ = [^=].* = $")


def load_wikitext(**kwargs) -> datasets.DatasetDict:
    """WikiText-2 raw test split cut into articles at top-level headings (like EleutherAI/wikitext_document_level)."""
    lines = _file(WIKITEXT2_TEST).read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    pages: list[list[str]] = []
    for line in lines:
        if _HEADING.match(line) or not pages:
            pages.append([])
        pages[-1].append(line)
    return _split("test", [{"page": "\n".join(page).strip("\n") + "\n"} for page in pages if "".join(page).strip()])


def wikitext_detokenizer(doc: dict) -> str:
    """lm-eval's wikitext detokenizer."""
    string = doc["page"]
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        string = string.replace(a, b)
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176)),
                 (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        string = string.replace(a, b)
    return string


def wikitext_process_results(doc: dict, results) -> dict:
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    size = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size), "bits_per_byte": (loglikelihood, size)}
