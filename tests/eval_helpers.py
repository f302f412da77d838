"""Helpers for the eval-harness tests: tiny checkpoints on disk and small benchmark files in
lmms-eval's schema (written by the tests themselves; nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import tiny


def save_tiny(path: Path, kind: str = "llava") -> Path:
    """A tiny random LLaVA (or LLaVA-NeXT) checkpoint folder with its processor."""
    model, proc = getattr(tiny, kind)()
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def images(n: int, size: tuple[int, int] = (40, 48)):
    return [tiny.image(size[0], size[1], i + 1) for i in range(n)]


def write_benchmarks(root: Path) -> dict[str, Path]:
    """vqav2 (save_to_disk), textvqa (jsonl + image files), gqa (parquet + images dataset), pope
    (parquet), refcoco (save_to_disk) with 3-4 rows each. Returns task -> path."""
    from datasets import Dataset, DatasetDict
    from datasets import Image as HFImage

    imgs = images(4)
    out = {}
    vqa = Dataset.from_dict({
        "question_id": [1, 2, 3],
        "question": ["what color?", "how many?", "is it red?"],
        "answers": [[{"answer": "red", "answer_id": i} for i in range(10)],
                    [{"answer": "two", "answer_id": i} for i in range(10)],
                    [{"answer": "yes", "answer_id": i} for i in range(10)]],
        "answer_type": ["other", "number", "yes/no"],
        "image": imgs[:3],
    }).cast_column("image", HFImage())
    out["vqav2"] = root / "vqav2"
    DatasetDict({"validation": vqa}).save_to_disk(str(out["vqav2"]))

    tv = root / "textvqa"
    tv.mkdir(parents=True)
    with open(tv / "validation.jsonl", "w") as fh:
        for i, img in enumerate(imgs[:3]):
            img.save(tv / f"{i}.png")
            fh.write(json.dumps({"question_id": i, "question": "what does it say?", "image": f"{i}.png",
                                 "answers": ["stop"] * 10}) + "\n")
    out["textvqa"] = tv

    gqa = root / "gqa"
    gqa.mkdir(parents=True)
    Dataset.from_dict({"id": ["q1", "q2", "q3"], "imageId": ["i0", "i1", "i0"],
                       "question": ["what is it?", "which side?", "is it big?"],
                       "answer": ["cat", "left", "no"]}).to_parquet(str(gqa / "testdev.parquet"))
    Dataset.from_dict({"id": ["i0", "i1"], "image": imgs[:2]}).cast_column("image", HFImage()).save_to_disk(
        str(gqa / "images"))
    out["gqa"] = gqa

    pope = root / "pope"
    pope.mkdir(parents=True)
    Dataset.from_dict({"question_id": [1, 2, 3, 4], "question": ["Is there a cat in the image?"] * 4,
                       "answer": ["yes", "no", "yes", "no"],
                       "category": ["adversarial", "adversarial", "random", "random"],
                       "image": imgs}).cast_column("image", HFImage()).to_parquet(str(pope / "test.parquet"))
    out["pope"] = pope

    ref = Dataset.from_dict({"question_id": [7, 8], "image": imgs[:2],
                             "answer": [["the left one", "left thing"], ["top"]],
                             "bbox": [[0.0, 0.0, 24.0, 20.0], [12.0, 10.0, 24.0, 20.0]]})
    ref = ref.cast_column("image", HFImage())
    out["refcoco"] = root / "refcoco"
    DatasetDict({"val": ref}).save_to_disk(str(out["refcoco"]))
    return out
