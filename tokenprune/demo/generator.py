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
# ``shapes(..., aspect="mixed")``: (width, height) cycled by example index: square, wide, tall (for models that
# keep the aspect ratio, e.g. Qwen2.5-VL, whose h / w position rows then differ)
MIXED_SIZES = ((IMG, IMG), (288, 192), (192, 288))
ASPECTS = ("square", "mixed")


def _cell_bounds(i: int, extent: int = IMG) -> tuple[int, int]:
    return round(i * extent / 3), round((i + 1) * extent / 3)


def image_size(aspect: str, index: int) -> tuple[int, int]:
    """``(width, height)`` of example ``index`` for ``aspect`` ("square": always ``IMG`` x ``IMG``)."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
    return (IMG, IMG) if aspect == "square" else MIXED_SIZES[index % len(MIXED_SIZES)]


def example_rng(split: str, seed: int, index: int, attempt: int = 0) -> np.random.Generator:
    """The random generator of example ``index`` of stream ``(split, seed)``; splits never share a stream."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    entropy = [SPLITS[split], int(seed), int(index), int(attempt), 0x5EED]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def sample_scene(rng: np.random.Generator, max_n: int = MAX_SHAPES, min_n: int = 1,
                 size: tuple[int, int] = (IMG, IMG)) -> list[dict[str, Any]]:
    """Draw min_n..max_n objects: dicts with ``color``, ``shape``, ``cell`` (0-8), ``bbox`` (px) in an image of
    ``size`` = (width, height); a shape is at most as large as its cell allows (``MAX_SIZE`` at 224 x 224)."""
    n = int(rng.integers(min_n, max_n + 1))
    cells = rng.choice(9, size=n, replace=False)
    combos = rng.choice(len(COLOR_NAMES) * len(SHAPE_NAMES), size=n, replace=False)
    objs = []
    for cell, combo in zip(cells, combos, strict=True):
        r, c = divmod(int(cell), 3)
        y0, y1 = _cell_bounds(r, size[1])
        x0, x1 = _cell_bounds(c, size[0])
        margin = 3
        side = int(rng.integers(MIN_SIZE, min(MAX_SIZE, x1 - x0 - 2 * margin, y1 - y0 - 2 * margin) + 1))
        x = int(rng.integers(x0 + margin, x1 - margin - side + 1))
        y = int(rng.integers(y0 + margin, y1 - margin - side + 1))
        objs.append({
            "shape": SHAPE_NAMES[int(combo) % len(SHAPE_NAMES)],
            "color": COLOR_NAMES[int(combo) // len(SHAPE_NAMES)],
            "cell": int(cell),
            "bbox": (x, y, x + side, y + side),
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


def render(objs: list[dict[str, Any]], rng: np.random.Generator, size: tuple[int, int] = (IMG, IMG)) -> Image.Image:
    """Noisy dark background plus the objects (``size`` = (width, height))."""
    bg = rng.integers(20, 45, size=(size[1], size[0], 1)) + rng.integers(-8, 9, size=(size[1], size[0], 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw_objects(ImageDraw.Draw(img), objs, lambda o: COLORS[o["color"]])
    return img


def norm_box(bbox: tuple[int, int, int, int], size: tuple[int, int] = (IMG, IMG)) -> list[float]:
    """Pixel box -> ``[x1, y1, x2, y2]`` normalised by the image size (width, height), two decimals."""
    return [round(v / size[i % 2], 2) for i, v in enumerate(bbox)]


def format_box(box: list[float]) -> str:
    """``[0.12, 0.34, 0.56, 0.78]``."""
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def _pick(rng: np.random.Generator, seq: list[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def sample_question(objs: list[dict[str, Any]], kind: str, rng: np.random.Generator,
                    want_yes: bool | None = None, size: tuple[int, int] = (IMG, IMG)) -> dict[str, Any] | None:
    """One question of ``kind`` about ``objs`` in an image of ``size`` (question/answer/kind[/box] dict), or
    None if impossible."""
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
                "kind": kind, "box": norm_box(o["bbox"], size), "target": o}
    if kind == "box":
        o = _pick(rng, objs)
        box = norm_box(o["bbox"], size)
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
               attempt: int = 0, size: tuple[int, int] = (IMG, IMG)
               ) -> tuple[Image.Image, list[dict[str, Any]], np.random.Generator]:
    """Image (``size`` = (width, height)) and objects of example ``index`` of stream ``(split, seed)``, plus the
    rng for its questions."""
    rng = example_rng(split, seed, index, attempt)
    objs = sample_scene(rng, max_n=max_n, min_n=min_n, size=size)
    return render(objs, rng, size), objs, rng


def shapes(split: str = "test", n: int = 500, seed: int = 0, aspect: str = "square") -> list[dict[str, Any]]:
    """The shapes benchmark: ``n`` examples, one question each, kinds in round-robin order.

    Each example is a dict with ``image`` (PIL RGB, 224 x 224; with ``aspect="mixed"`` the sizes cycle
    through ``MIXED_SIZES``: 224 x 224, 288 x 192, 192 x 288), ``question``, ``answer`` (short text),
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
        size = image_size(aspect, i)
        img, objs, rng = make_scene(split, seed, i, size=size)
        qa = sample_question(objs, kind, rng, want_yes=want_yes, size=size)
        attempt = 0
        while qa is None:  # only attribute can fail (e.g. two triangles and no unique colour): redraw scene
            attempt += 1
            img, objs, rng = make_scene(split, seed, i, attempt=attempt, size=size)
            qa = sample_question(objs, kind, rng, want_yes=want_yes, size=size)
        qa.pop("target", None)
        out.append({"image": img, **qa, "objects": objs})
    return out
