"""Local benchmark files in lmms-eval's schema: a ``datasets`` ``save_to_disk`` folder, parquet or jsonl.

Nothing here touches a hub. A task's data lives at ``--data TASK=PATH`` or ``$TOKENPRUNE_DATA/TASK``
(default ``./data/TASK``); a missing one raises :class:`DatasetMissingError` that says where to put it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image


class DatasetMissingError(FileNotFoundError):
    """A benchmark's local files are not where the harness looks for them."""


def data_root() -> Path:
    """``$TOKENPRUNE_DATA`` or ``./data``."""
    return Path(os.environ.get("TOKENPRUNE_DATA", "data"))


def locate(task: str, path: str | Path | None, schema: str) -> Path:
    """The folder or file holding ``task``'s rows, or a :class:`DatasetMissingError` naming where to put it."""
    where = Path(path) if path is not None else data_root() / task
    if where.exists():
        return where
    raise DatasetMissingError(
        f"{task}: no local data at {where}. Put the lmms-eval dataset there, as a `datasets` save_to_disk "
        f"folder, *.parquet files or a *.jsonl file (image paths relative to it), with fields {schema}; "
        f"or pass --data {task}=PATH (or set TOKENPRUNE_DATA). Nothing is downloaded."
    )


def to_image(value: Any, base: Path | None = None) -> Image.Image:
    """A PIL RGB image from a PIL image, ``{"bytes"|"path": ...}`` (HF Image feature) or a path."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value.get("path")
    if isinstance(value, (str, Path)):
        p = Path(value)
        if not p.is_absolute() and base is not None:
            p = base / p
        return Image.open(p).convert("RGB")
    raise TypeError(f"image: cannot read an image from {type(value).__name__}")


def _pick_split(ds: Any, split: str | None) -> Any:
    """The ``split`` of a ``DatasetDict`` (or its only split); a ``Dataset`` as is."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    names = list(ds.keys())
    if split is not None and split in names:
        return ds[split]
    if len(names) == 1:
        return ds[names[0]]
    raise ValueError(f"dataset has splits {names}; expected {split!r}")


def load_rows(where: Path, split: str | None = None) -> tuple[list[dict[str, Any]], Path]:
    """Rows of a local dataset (``save_to_disk`` folder, parquet file(s) or jsonl) and the folder that
    relative image paths are resolved against."""
    base = where if where.is_dir() else where.parent
    if where.is_dir() and ((where / "dataset_info.json").exists() or (where / "dataset_dict.json").exists()
                           or (where / "state.json").exists()):
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("reading a save_to_disk dataset needs `datasets`: pip install 'tokenprune-vlm[eval]'") \
                from e
        ds = _pick_split(datasets.load_from_disk(str(where)), split)
        return [dict(r) for r in ds], base
    files = sorted(where.glob("*.parquet")) + sorted(where.glob("*.jsonl")) if where.is_dir() else [where]
    if split is not None and where.is_dir():
        chosen = [f for f in files if f.stem.startswith(split)]
        files = chosen or files
    if not files:
        raise DatasetMissingError(f"{where}: no *.parquet, *.jsonl or save_to_disk dataset inside")
    rows: list[dict[str, Any]] = []
    for f in files:
        if f.suffix == ".jsonl":
            with open(f) as fh:
                rows.extend(json.loads(line) for line in fh if line.strip())
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(f).to_pylist())
        else:
            raise DatasetMissingError(f"{f}: expected a .parquet or .jsonl file")
    return rows, base
