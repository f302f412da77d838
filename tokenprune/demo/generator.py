"""Deterministic synthetic "shapes" benchmark (PIL only, no download).

Each image is ``IMG`` x ``IMG`` pixels with a noisy dark background and 1-5 shapes (circle / square /
triangle, six colours, several sizes). Shapes sit in distinct cells of a 3x3 grid, with their whole box
inside the cell, so the grid-cell answer is unambiguous; cells are drawn uniformly, so the top rows and
the corners are as likely as the centre. ``(colour, shape)`` pairs are unique within an image, and other
shapes sharing the colour or the shape of the referent act as distractors.

Question kinds (short answers):

* ``attribute``: "What color is the triangle?" -> ``red`` / "What shape is the red object?" -> ``square``
* ``counting``: "How many circles are there?" / "How many shapes are there?" -> ``0`` .. ``5``
* ``existence``: "Is there a blue square?" -> ``yes`` / ``no`` (balanced; negatives share the colour or the
  shape of a present object when possible, POPE-"adversarial" style)
* ``localization``: "Where is the red circle?" -> a 3x3 grid cell name (``top-left`` ... ``bottom-right``)
* ``box``: "Give the bounding box of the green square." -> ``[x1, y1, x2, y2]`` normalised to [0, 1], two
  decimals (scored by IoU >= 0.5, RefCOCO-style)

Everything is a pure function of ``(split, seed, index)``; the splits draw from disjoint seed streams.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMG = 224
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
COLOR_NAMES = list(COLORS)
SHAPE_NAMES = ["circle", "square", "triangle"]
CELL_NAMES = [
    "top-left", "top-center", "top-right",
    "middle-left", "center", "middle-right",
    "bottom-left", "bottom-center", "bottom-right",
]
KINDS = ("attribute", "counting", "existence", "localization", "box")
SPLITS = {"train": 0, "val": 1, "test": 2}
MAX_SHAPES = 5
MIN_SIZE, MAX_SIZE = 28, 64  # pixels at IMG = 224 (14-32 px at the 112-px model input)


def _cell_bounds(i: int) -> tuple[int, int]:
    return round(i * IMG / 3), round((i + 1) * IMG / 3)


def example_rng(split: str, seed: int, index: int, attempt: int = 0) -> np.random.Generator:
    """The random generator of example ``index`` of stream ``(split, seed)``; splits never share a stream."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    entropy = [SPLITS[split], int(seed), int(index), int(attempt), 0x5EED]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def sample_scene(rng: np.random.Generator, max_n: int = MAX_SHAPES, min_n: int = 1) -> list[dict[str, Any]]:
    """Draw min_n..max_n objects: dicts with ``color``, ``shape``, ``cell`` (0-8), ``bbox`` (px)."""
    n = int(rng.integers(min_n, max_n + 1))
    cells = rng.choice(9, size=n, replace=False)
    combos = rng.choice(len(COLOR_NAMES) * len(SHAPE_NAMES), size=n, replace=False)
    objs = []
    for cell, combo in zip(cells, combos, strict=True):
        r, c = divmod(int(cell), 3)
        y0, y1 = _cell_bounds(r)
        x0, x1 = _cell_bounds(c)
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        margin = 3
        x = int(rng.integers(x0 + margin, x1 - margin - size + 1))
        y = int(rng.integers(y0 + margin, y1 - margin - size + 1))
        objs.append({
            "shape": SHAPE_NAMES[int(combo) % len(SHAPE_NAMES)],
            "color": COLOR_NAMES[int(combo) // len(SHAPE_NAMES)],
            "cell": int(cell),
            "bbox": (x, y, x + size, y + size),
        })
    return objs


def draw_objects(draw: ImageDraw.ImageDraw, objs: list[dict[str, Any]], fill_fn: Any) -> None:
    """Draw each object with colour ``fill_fn(obj)`` (used for the image and for label masks)."""
    for o in objs:
        x0, y0, x1, y1 = o["bbox"]
        col = fill_fn(o)
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=col)
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=col)
        else:
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=col)


def render(objs: list[dict[str, Any]], rng: np.random.Generator) -> Image.Image:
    """Noisy dark background plus the objects."""
    bg = rng.integers(20, 45, size=(IMG, IMG, 1)) + rng.integers(-8, 9, size=(IMG, IMG, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw_objects(ImageDraw.Draw(img), objs, lambda o: COLORS[o["color"]])
    return img


def norm_box(bbox: tuple[int, int, int, int]) -> list[float]:
    """Pixel box -> ``[x1, y1, x2, y2]`` normalised by the image size, two decimals."""
    return [round(v / IMG, 2) for v in bbox]


def format_box(box: list[float]) -> str:
    """``[0.12, 0.34, 0.56, 0.78]``."""
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def _pick(rng: np.random.Generator, seq: list[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def sample_question(objs: list[dict[str, Any]], kind: str, rng: np.random.Generator,
                    want_yes: bool | None = None) -> dict[str, Any] | None:
    """One question of ``kind`` about ``objs`` (question/answer/kind[/box] dict), or None if impossible."""
    if kind == "attribute":
        cands = []
        for s in SHAPE_NAMES:
            m = [o for o in objs if o["shape"] == s]
            if len(m) == 1:
                cands.append((f"What color is the {s}?", m[0]["color"], m[0]))
        for c in COLOR_NAMES:
            m = [o for o in objs if o["color"] == c]
            if len(m) == 1:
                cands.append((f"What shape is the {c} object?", m[0]["shape"], m[0]))
        if not cands:
            return None
        q, a, o = _pick(rng, cands)
        return {"question": q, "answer": a, "kind": kind, "target": o}
    if kind == "counting":
        if rng.random() < 0.4:
            return {"question": "How many shapes are there?", "answer": str(len(objs)), "kind": kind}
        present = sorted({o["shape"] for o in objs})
        s = _pick(rng, present) if rng.random() < 0.8 else _pick(rng, SHAPE_NAMES)
        k = sum(o["shape"] == s for o in objs)
        return {"question": f"How many {s}s are there?", "answer": str(k), "kind": kind}
    if kind == "localization":
        o = _pick(rng, objs)
        return {"question": f"Where is the {o['color']} {o['shape']}?", "answer": CELL_NAMES[o["cell"]],
                "kind": kind, "box": norm_box(o["bbox"]), "target": o}
    if kind == "box":
        o = _pick(rng, objs)
        box = norm_box(o["bbox"])
        return {"question": f"Give the bounding box of the {o['color']} {o['shape']}.",
                "answer": format_box(box), "kind": kind, "box": box, "target": o}
    if kind == "existence":
        present = {(o["color"], o["shape"]) for o in objs}
        yes = bool(rng.random() < 0.5) if want_yes is None else want_yes
        if yes:
            c, s = _pick(rng, sorted(present))
            return {"question": f"Is there a {c} {s}?", "answer": "yes", "kind": kind}
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPE_NAMES if (c, s) not in present]
        shapes_p = {s for _, s in present}
        colors_p = {c for c, _ in present}
        adv = [(c, s) for c, s in absent if s in shapes_p or c in colors_p]
        pool = adv if (adv and rng.random() < 0.75) else absent
        c, s = _pick(rng, pool)
        return {"question": f"Is there a {c} {s}?", "answer": "no", "kind": kind}
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def make_scene(split: str, seed: int, index: int, max_n: int = MAX_SHAPES, min_n: int = 1,
               attempt: int = 0) -> tuple[Image.Image, list[dict[str, Any]], np.random.Generator]:
    """Image and objects of example ``index`` of stream ``(split, seed)``, plus the rng for its questions."""
    rng = example_rng(split, seed, index, attempt)
    objs = sample_scene(rng, max_n=max_n, min_n=min_n)
    return render(objs, rng), objs, rng


def shapes(split: str = "test", n: int = 500, seed: int = 0) -> list[dict[str, Any]]:
    """The shapes benchmark: ``n`` examples, one question each, kinds in round-robin order.

    Each example is a dict with ``image`` (PIL RGB, 224 x 224), ``question``, ``answer`` (short text),
    ``kind`` (one of ``KINDS``), ``box`` (normalised ``[x1, y1, x2, y2]`` of the referent; only for
    ``box`` and ``localization``) and ``objects`` (the ground-truth scene). Existence answers alternate
    yes/no, so that kind is exactly balanced. Deterministic in ``(split, n, seed)``; a prefix of a larger
    ``n`` equals the smaller set.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        want_yes = (i // len(KINDS)) % 2 == 0 if kind == "existence" else None
        img, objs, rng = make_scene(split, seed, i)
        qa = sample_question(objs, kind, rng, want_yes=want_yes)
        attempt = 0
        while qa is None:  # only attribute can fail (e.g. two triangles and no unique colour): redraw scene
            attempt += 1
            img, objs, rng = make_scene(split, seed, i, attempt=attempt)
            qa = sample_question(objs, kind, rng, want_yes=want_yes)
        qa.pop("target", None)
        out.append({"image": img, **qa, "objects": objs})
    return out
