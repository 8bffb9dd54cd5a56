"""The performance model's generated tables as the reports read them (MODEL, never measurement).

- fastconvnext/prior.json: per (op, arch, dtype, channels, hw, batch, mode), the fused time on the model, the same
  at the low edge of the public L2 -> SM bandwidth, the eager estimate and the eager floor (µs). The runtime reads
  only its fused and eager-estimate columns (fastconvnext.backend.read_prior), as the auto policy's prior.
- fastconvnext/tooling/launches.json: the per-launch estimates (bf16, batch 256) those sums are made of.
Both are written by `python -m fastconvnext.tooling.sass_report`.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

PRIOR_PATH = Path(__file__).resolve().parents[1] / "prior.json"
LAUNCHES_PATH = Path(__file__).resolve().parent / "launches.json"
KEY_COLUMNS = ("op", "arch", "dtype", "channels", "hw", "batch", "mode")


@functools.lru_cache(maxsize=None)
def prior_document(path: Path = PRIOR_PATH):
    """The prior as written (dict), or None when the file is absent."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def prior(path: Path = PRIOR_PATH):
    """{key tuple: {column: value}} of every prior row, or None without a prior."""
    document = prior_document(path)
    if document is None:
        return None
    columns = document["columns"]
    table = {}
    for row in document["rows"]:
        record = dict(zip(columns, row))
        table[tuple(record[c] for c in KEY_COLUMNS)] = record
    return table


def stamp(path: Path = PRIOR_PATH) -> str:
    """Where the prior came from: its command and versions ("" without one)."""
    document = prior_document(path)
    if document is None:
        return ""
    return f"`{document.get('generated_by', '?')}`, {document.get('versions', '?')}"


@functools.lru_cache(maxsize=None)
def launches(path: Path = LAUNCHES_PATH) -> dict:
    """{key tuple: [launch record]} from launches.json ({} when absent)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return {tuple(case["key"]): case["launches"] for case in document["cases"]}
