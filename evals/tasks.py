"""Evaluation tasks: the bundled synthetic ``shapes`` benchmark and local copies of VQAv2, GQA,
TextVQA, POPE and RefCOCO (bbox REC) in lmms-eval's schema, with lmms-eval's prompts and scoring.

A task turns its rows into *docs* (``id``, ``image``, ``text`` = the user turn without the image
token, ``kind``), scores one prediction into a JSON-able *record*, and aggregates records into
metrics. Records carry everything aggregation needs, so shards from several processes merge.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import metrics as M
from .data import load_rows, locate, to_image

SHORT = "\nAnswer the question using a single word or phrase."
REC_PROMPT = (
    "Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, bottom-right y). "
    "All values are floating point numbers bounded between 0 and 1. Please provide the bounding box coordinate "
    "of the region this sentence describes: "
)


@dataclass
class Task:
    """One benchmark: how to load it, prompt it, score and aggregate it."""

    name: str
    max_new_tokens: int
    headline: str  # the metric reported as "accuracy"
    description: str

    def docs(self, limit: int | None, seed: int, path: str | None = None) -> list[dict[str, Any]]:
        raise NotImplementedError

    def score(self, doc: dict[str, Any], prediction: str) -> dict[str, Any]:
        raise NotImplementedError

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """``accuracy`` (the headline), ``n``, ``by_kind`` mean score per kind, task extras."""
        by_kind: dict[str, list[float]] = defaultdict(list)
        for r in records:
            by_kind[r["kind"]].append(r["score"])
        n = len(records)
        return {
            "accuracy": sum(r["score"] for r in records) / n if n else 0.0,
            "n": n,
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "metric": self.headline,
        }


def _limit(rows: list[Any], limit: int | None) -> list[Any]:
    return rows if limit is None else rows[:limit]


class Shapes(Task):
    """The bundled synthetic benchmark (``tokenprune.demo.shapes``): attribute, counting, existence
    (POPE-style yes/no), localization (3x3 cell) and box (``[x1, y1, x2, y2]``, Acc@IoU>=0.5)."""

    def __init__(self, fixture: str | None = None) -> None:
        super().__init__("shapes", 12, "accuracy (exact match; box: IoU>=0.5)", "bundled synthetic shapes, test split")
        self.fixture = fixture

    def docs(self, limit: int | None, seed: int, path: str | None = None) -> list[dict[str, Any]]:
        """Square images, or the images bundled fixture ``self.fixture`` is evaluated on (``qwen2_5_vl``: square,
        wide and tall; ``tokenprune.demo.fixture_shapes``)."""
        from tokenprune.demo import fixture_shapes, shapes

        n = 500 if limit is None else limit
        examples = fixture_shapes(self.fixture, "test", n, seed) if self.fixture else shapes("test", n, seed)
        return [{"id": f"shapes-test-{seed}-{i}", "image": ex["image"], "text": ex["question"], "kind": ex["kind"],
                 "answer": ex["answer"], "box": ex.get("box")} for i, ex in enumerate(examples)]

    def score(self, doc: dict[str, Any], prediction: str) -> dict[str, Any]:
        from tokenprune.demo import score
        from tokenprune.demo.scoring import normalize_answer

        rec = {"kind": doc["kind"], "answer": doc["answer"], "score": score(doc["kind"], prediction, doc)}
        if doc["kind"] == "existence":
            rec["pope_pred"] = normalize_answer(prediction)
        if doc["kind"] == "box":
            rec["pred_box"], rec["gt_box"] = M.parse_box(prediction), list(doc["box"])
        return rec

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().aggregate(records)
        ex = [r for r in records if r["kind"] == "existence"]
        if ex:
            out["pope"] = M.pope_metrics([r["pope_pred"] for r in ex], [r["answer"] for r in ex])
        bx = [r for r in records if r["kind"] == "box"]
        if bx:
            out["rec"] = M.rec_metrics([r["pred_box"] for r in bx], [r["gt_box"] for r in bx])
        return out


class LocalTask(Task):
    """A benchmark read from local files (see :mod:`evals.data`)."""

    schema = ""
    split: str | None = None

    def rows(self, limit: int | None, path: str | None) -> tuple[list[dict[str, Any]], Path]:
        rows, base = load_rows(locate(self.name, path, self.schema), self.split)
        return rows, base

    def docs(self, limit: int | None, seed: int, path: str | None = None) -> list[dict[str, Any]]:
        rows, base = self.rows(limit, path)
        out = []
        for i, row in enumerate(rows):
            doc = self.to_doc(row, base)
            doc.setdefault("id", str(row.get("question_id", row.get("id", i))))
            out.append(doc)
            if limit is not None and len(out) >= limit:
                break
        return out

    def to_doc(self, row: dict[str, Any], base: Path) -> dict[str, Any]:
        raise NotImplementedError


class VQAv2(LocalTask):
    schema = "question_id, question, image, answers (list of {answer: ...} or strings)"
    split = "validation"

    def __init__(self, name: str = "vqav2", style: str = "vqav2") -> None:
        super().__init__(name, 16, "VQA soft accuracy (EvalAI)", f"{name} (lmms-eval {name}_val prompt and metric)")
        self.style = style

    def to_doc(self, row: dict[str, Any], base: Path) -> dict[str, Any]:
        q = row["question"].capitalize() if self.style == "textvqa" else row["question"]
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in row["answers"]]
        kind = row.get("answer_type") or row.get("question_type") or self.name
        return {"image": to_image(row["image"], base), "text": q + SHORT, "answers": answers, "kind": str(kind)}

    def score(self, doc: dict[str, Any], prediction: str) -> dict[str, Any]:
        return {"kind": doc["kind"], "score": M.vqa_accuracy(prediction, doc["answers"], self.style)}


class GQA(LocalTask):
    schema = "id, question, answer, image (or imageId + an `images` dataset / images/<imageId>.jpg beside it)"
    split = "testdev"

    def __init__(self) -> None:
        super().__init__("gqa", 16, "exact match (ignore case, punctuation)", "GQA testdev-balanced (lmms-eval gqa)")
        self._images: dict[str, Any] | None = None

    def _image(self, row: dict[str, Any], base: Path) -> Any:
        if row.get("image") is not None:
            return to_image(row["image"], base)
        image_id = str(row["imageId"])
        if self._images is None:
            self._images = {}
            img_dir = base / "images"
            if img_dir.is_dir() and not any(img_dir.glob("*.jpg")) and not any(img_dir.glob("*.png")):
                rows, ibase = load_rows(img_dir, "testdev")
                self._images = {str(r["id"]): (r["image"], ibase) for r in rows}
        if image_id in self._images:
            return to_image(*self._images[image_id])
        for ext in (".jpg", ".png"):
            p = base / "images" / f"{image_id}{ext}"
            if p.exists():
                return to_image(p)
        raise FileNotFoundError(f"gqa: image {image_id} not found under {base / 'images'}")

    def to_doc(self, row: dict[str, Any], base: Path) -> dict[str, Any]:
        return {"image": self._image(row, base), "text": row["question"] + SHORT, "answer": row["answer"],
                "kind": str(row.get("types", {}).get("structural", "gqa") if isinstance(row.get("types"), dict)
                            else "gqa")}

    def score(self, doc: dict[str, Any], prediction: str) -> dict[str, Any]:
        return {"kind": doc["kind"], "score": M.exact_match(prediction, doc["answer"])}


class POPE(LocalTask):
    schema = "question_id, question, answer (yes/no), image, category (adversarial/popular/random)"
    split = "test"

    def __init__(self) -> None:
        super().__init__("pope", 16, "accuracy (F1 etc. under `pope`)", "POPE, all categories pooled (lmms-eval pope)")

    def to_doc(self, row: dict[str, Any], base: Path) -> dict[str, Any]:
        return {"image": to_image(row["image"], base), "text": row["question"].strip() + SHORT,
                "answer": row["answer"], "kind": str(row.get("category", "pope"))}

    def score(self, doc: dict[str, Any], prediction: str) -> dict[str, Any]:
        pred = prediction.lower().strip()
        return {"kind": doc["kind"], "answer": doc["answer"], "pope_pred": pred,
                "score": float(pred == doc["answer"].lower().strip())}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().aggregate(records)
        out["pope"] = M.pope_metrics([r["pope_pred"] for r in records], [r["answer"] for r in records])
        out["pope_by_category"] = {
            k: M.pope_metrics([r["pope_pred"] for r in records if r["kind"] == k],
                              [r["answer"] for r in records if r["kind"] == k])
            for k in sorted({r["kind"] for r in records})
        }
        return out


class RefCOCO(LocalTask):
    schema = "question_id, image, answer (list of referring expressions), bbox ([x, y, w, h] pixels)"
    split = "val"

    def __init__(self) -> None:
        super().__init__("refcoco", 32, "Acc@IoU>=0.5", "RefCOCO bbox REC (lmms-eval refcoco_bbox_rec)")

    def docs(self, limit: int | None, seed: int, path: str | None = None) -> list[dict[str, Any]]:
        rows, base = self.rows(limit, path)
        out = []
        for i, row in enumerate(rows):  # one doc per referring expression ("exploded", as lmms-eval)
            img = to_image(row["image"], base)
            w, h = img.size
            x, y, bw, bh = (float(v) for v in row["bbox"])
            box = [x / w, y / h, (x + bw) / w, (y + bh) / h]
            exprs = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
            for j, expr in enumerate(exprs):
                out.append({"id": f"{row.get('question_id', i)}-{j}", "image": img, "text": REC_PROMPT + expr,
                            "box": box, "kind": "refcoco", "size": [w, h]})
                if limit is not None and len(out) >= limit:
                    return out
        return out

    def score(self, doc: dict[str, Any], prediction: str) -> dict[str, Any]:
        pred = M.parse_box(prediction)
        return {"kind": doc["kind"], "pred_box": pred, "gt_box": doc["box"],
                "score": float(M.box_iou(pred, doc["box"]) >= 0.5)}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().aggregate(records)
        out["rec"] = M.rec_metrics([r["pred_box"] for r in records], [r["gt_box"] for r in records])
        return out


TASKS: dict[str, Callable[[], Task]] = {
    "shapes": Shapes,
    "vqav2": VQAv2,
    "textvqa": lambda: VQAv2("textvqa", "textvqa"),
    "gqa": GQA,
    "pope": POPE,
    "refcoco": RefCOCO,
}


def get_task(name: str, fixture: str | None = None) -> Task:
    """The task called ``name`` (see :data:`TASKS`); ``fixture``: the bundled fixture under test, if any (``shapes``
    then draws the images that fixture is evaluated on)."""
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; available: {sorted(TASKS)}")
    return Shapes(fixture) if name == "shapes" else TASKS[name]()
