"""Scoring rules, mirroring lmms-eval 0.7.3 (``tasks/_task_utils/vqa_eval_metric.py``, ``tasks/vqav2``,
``tasks/textvqa``, ``tasks/gqa``, ``tasks/pope``, ``tasks/refcoco/utils_rec.py``).

* :func:`vqa_accuracy`: VQA soft accuracy, EvalAI normalisation, ``min(1, matches / 3)`` averaged over
  the leave-one-out subsets of the reference answers (VQAv2 and TextVQA flavours of the normalisation).
* :func:`exact_match`: GQA (ignore case and punctuation, HF ``evaluate`` style).
* :func:`pope_metrics`: accuracy / precision / recall / F1 / yes-ratio ("yes" is the positive class).
* :func:`parse_box`, :func:`box_iou`, :func:`rec_metrics`: RefCOCO REC, ``[x1, y1, x2, y2]`` in [0, 1],
  Acc@IoU >= 0.5 (and 0.1 ... 0.9, mean IoU, centre accuracy); an unparsable answer is ``[0, 0, 0, 0]``.
* :func:`padded_to_original`: maps a box from LLaVA's padded-square frame to the original image.
"""

from __future__ import annotations

import re
import statistics
import string
from collections.abc import Sequence
from typing import Any

from tokenprune.demo.scoring import iou as box_iou  # IoU of two [x1, y1, x2, y2] boxes

# --- EvalAI answer normalisation (the tables are EvalAI's / MMF's, as in lmms-eval) -----------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!"]


def process_punctuation(text: str) -> str:
    """EvalAI punctuation handling: strip or space out punctuation, drop periods not inside numbers."""
    out = text
    for p in PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or (re.search(COMMA_STRIP, text) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, re.UNICODE)


def process_digit_article(text: str) -> str:
    """EvalAI: lower-case, number words to digits, drop articles, restore contractions."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def evalai_normalize(text: str) -> str:
    """The full EvalAI processor (lmms-eval's ``EvalAIAnswerProcessor.__call__``, used for TextVQA)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _vqav2_normalize(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[Any], style: str = "vqav2") -> float:
    """VQA soft accuracy of ``prediction`` against the reference ``answers`` (strings, or VQAv2's
    ``{"answer": ...}`` dicts): mean over leave-one-out subsets of ``min(1, matches / 3)``.
    ``style="vqav2"`` normalises like lmms-eval's VQAv2 task, ``"textvqa"`` like its TextVQA task."""
    if style not in ("vqav2", "textvqa"):
        raise ValueError(f"style: expected 'vqav2' or 'textvqa', got {style!r}")
    refs = [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
    if not refs:
        return 0.0
    norm = _vqav2_normalize if style == "vqav2" else evalai_normalize
    pred = norm(prediction)
    refs = [norm(r) for r in refs]
    accs = []
    for i in range(len(refs)):
        matches = sum(1 for j, r in enumerate(refs) if j != i and r == pred)
        accs.append(min(1.0, matches / 3))
    return float(statistics.mean(accs))


_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, reference: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> float:
    """1.0 if equal after (optional) lower-casing and removing ``string.punctuation`` (GQA rule);
    surrounding whitespace is stripped."""
    p, r = prediction.strip(), reference.strip()
    if ignore_case:
        p, r = p.lower(), r.lower()
    if ignore_punctuation:
        p, r = p.translate(_PUNCT_TABLE), r.translate(_PUNCT_TABLE)
    return float(p.strip() == r.strip())


def pope_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 and yes-ratio (of the ground truth, as lmms-eval).

    A prediction counts as its lower-cased, stripped text; only exact ``"yes"``/``"no"`` match."""
    preds = [p.lower().strip() for p in predictions]
    gts = [a.lower().strip() for a in answers]
    n = len(gts)
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, gts))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, gts))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, gts))
    acc = sum(p == g for p, g in zip(preds, gts)) / n if n else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    yes = sum(g == "yes" for g in gts)
    no = sum(g == "no" for g in gts)
    return {"accuracy": acc, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": yes / (yes + no) if yes + no else 0.0}


_BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?)\s*\]")


def parse_box(text: str) -> list[float]:
    """The first ``[a, b, c, d]`` of numbers in ``text`` (lmms-eval's regex); ``[0, 0, 0, 0]`` if none."""
    m = _BOX.search(text)
    return [float(m.group(i)) for i in range(1, 5)] if m else [0.0, 0.0, 0.0, 0.0]


def center_hit(pred: Sequence[float], gt: Sequence[float]) -> bool:
    """lmms-eval's Center_ACC: the predicted box's centre lies inside the ground-truth box."""
    cx, cy = (pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2
    return gt[0] <= cx <= gt[2] and gt[1] <= cy <= gt[3]


REC_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)


def rec_metrics(pred_boxes: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[float]]) -> dict[str, float]:
    """RefCOCO REC aggregates: mean ``IoU``, ``ACC@t`` for t in 0.1..0.9 and ``Center_ACC``."""
    n = len(gt_boxes)
    if n == 0:
        return {"IoU": 0.0, **{f"ACC@{t}": 0.0 for t in REC_THRESHOLDS}, "Center_ACC": 0.0}
    ious = [box_iou(p, g) for p, g in zip(pred_boxes, gt_boxes)]
    out = {"IoU": sum(ious) / n}
    for t in REC_THRESHOLDS:
        out[f"ACC@{t}"] = sum(i >= t for i in ious) / n
    out["Center_ACC"] = sum(center_hit(p, g) for p, g in zip(pred_boxes, gt_boxes)) / n
    return out


def padded_to_original(box: Sequence[float], width: int, height: int) -> list[float]:
    """Map a box normalised to LLaVA's padded square (expand2square, image centred) back to the
    original ``width`` x ``height`` image, normalised and clipped to [0, 1]."""
    side = max(width, height)
    ox, oy = (side - width) / 2, (side - height) / 2
    x1, y1, x2, y2 = (box[0] * side - ox) / width, (box[1] * side - oy) / height, \
        (box[2] * side - ox) / width, (box[3] * side - oy) / height
    return [min(1.0, max(0.0, v)) for v in (x1, y1, x2, y2)]
