"""lmms-eval and lm-eval integrations, run in-process on small local tasks (skipped without the package)."""

from __future__ import annotations

import os
import textwrap
from importlib.metadata import entry_points

import eval_helpers
import pytest

pytest.importorskip("datasets")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return eval_helpers.save_tiny(tmp_path_factory.mktemp("tiny_int") / "llava")


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory):
    from datasets import Dataset, DatasetDict
    from datasets import Image as HFImage

    root = tmp_path_factory.mktemp("tasks")
    ds = Dataset.from_dict({"question_id": [0, 1, 2], "question": ["what is shown?", "describe it.", "what?"],
                            "answer": ["red", "cat", "dog"], "image": eval_helpers.images(3)})
    ds = ds.cast_column("image", HFImage())
    DatasetDict({"test": ds}).save_to_disk(str(root / "ds"))
    ds.to_parquet(str(root / "test.parquet"))
    return root


def _direct(tiny_dir, rows_root, method: str) -> list[str]:
    """What the shared wrapper generates for the same docs, for comparison with the harness outputs."""
    from datasets import load_from_disk

    from integrations.common import PrunedVLM

    vlm = PrunedVLM(str(tiny_dir), method=method, budget=0.5 if method != "none" else None)
    docs = load_from_disk(str(rows_root / "ds"))["test"]
    out = [vlm.generate(d["question"], [d["image"].convert("RGB")], {"max_new_tokens": 3}) for d in docs]
    if method != "none":
        assert vlm.handle.trace is not None and vlm.handle.trace.realized_budget < 1.0
    return out


def test_lmms_eval_entry_point_and_evaluator(tiny_dir, local_rows):
    pytest.importorskip("lmms_eval.evaluator")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    manifest = MODEL_REGISTRY_V2.get_manifest("tokenprune")  # registered via the lmms_eval.models entry point
    # the installed entry point's module (tokenprune.integrations.lmms_eval_model; test_packaging checks the name)
    (ep,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "tokenprune"]
    assert manifest.simple_class_path == f"{ep.module}.TokenpruneLMM"
    tasks = local_rows / "lmms_tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "tp_utils.py").write_text(
        "def doc_to_visual(doc):\n    return [doc['image'].convert('RGB')]\n\n"
        "def doc_to_text(doc, lmms_eval_specific_kwargs=None):\n    return doc['question']\n")
    (tasks / "tp_local.yaml").write_text(textwrap.dedent(f"""
        task: tp_local
        dataset_path: {local_rows / 'ds'}
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        output_type: generate_until
        doc_to_visual: !function tp_utils.doc_to_visual
        doc_to_text: !function tp_utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 3
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
            ignore_case: true
            ignore_punctuation: true
        """))
    res = simple_evaluate(model="tokenprune", model_args=f"pretrained={tiny_dir},method=fastv,budget=0.5",
                          tasks=["tp_local"], task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                          log_samples=True, batch_size=1)
    assert "exact_match,none" in res["results"]["tp_local"]
    got = [s["resps"][0][0] for s in sorted(res["samples"]["tp_local"], key=lambda s: s["doc_id"])]
    assert got == _direct(tiny_dir, local_rows, "fastv")


def test_lm_eval_registry_and_evaluator(tiny_dir, local_rows):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from integrations.lm_eval_model import TokenpruneLM

    assert get_model("tokenprune") is TokenpruneLM and TokenpruneLM.MULTIMODAL
    tasks = local_rows / "lm_tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "tp_lm.yaml").write_text(textwrap.dedent(f"""
        task: tp_lm_local
        dataset_path: parquet
        dataset_kwargs:
          data_files:
            test: {local_rows / 'test.parquet'}
        test_split: test
        output_type: generate_until
        doc_to_text: "<image>{{{{question}}}}"
        doc_to_image:
          - image
        doc_to_target: answer
        generation_kwargs:
          until: ["</s>"]
          max_gen_toks: 3
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 0
        """))
    res = lm_eval.simple_evaluate(model="tokenprune", model_args=f"pretrained={tiny_dir},method=random,budget=0.5",
                                  tasks=["tp_lm_local"],
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                  log_samples=True)
    assert res["results"]["tp_lm_local"]["sample_len"] == 3
    got = [s["resps"][0][0] for s in sorted(res["samples"]["tp_lm_local"], key=lambda s: s["doc_id"])]
    assert got == _direct(tiny_dir, local_rows, "random")


def test_metrics_match_lmms_eval_implementation():
    pytest.importorskip("lmms_eval.tasks")
    import random

    from lmms_eval.tasks.textvqa.utils import textvqa_process_results
    from lmms_eval.tasks.vqav2.utils import vqav2_process_results

    from evals import metrics as M

    rng = random.Random(0)
    words = ["a", "the", "Dog", "dont", "two", "1,000", "3.5", "yes.", "no!", "it's", "red/blue", "(x)", "None"]
    for _ in range(300):
        pred = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        ans = [pred] * rng.randint(0, 4) + [" ".join(rng.choice(words) for _ in range(2)) for _ in range(10)]
        ans = ans[:10]
        ref_tv = textvqa_process_results({"answers": list(ans), "question_id": 0}, [pred])["exact_match"]
        ref_vqa = vqav2_process_results({"answers": [{"answer": a, "answer_id": i} for i, a in enumerate(ans)],
                                         "question_id": 0}, [pred])["exact_match"]
        assert M.vqa_accuracy(pred, ans, "textvqa") == pytest.approx(ref_tv)
        assert M.vqa_accuracy(pred, ans, "vqav2") == pytest.approx(ref_vqa)
