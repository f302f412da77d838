"""tokenprune's vLLM plugin end to end on the bundled LLaVA, LLaVA-NeXT and Qwen2.5-VL fixtures: answers
and kept sets equal the Hugging Face hooks', the prompt holds text + kept tokens, budget 1.0 and the
missing key are stock vLLM, bad entries fail at engine start with typed errors, and the entry point works
in vLLM's multi-process mode. Runs only where vLLM is installed (the venv .ci/vllm.sh builds:
pip install 'tokenprune-vlm[vllm]'); engines run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) except in
the multi-process test."""

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

pytest.importorskip("vllm.entrypoints.llm", reason="vLLM not installed: these tests run in the vLLM venv (.ci/vllm.sh)")

from evals.vllm_agreement import (  # noqa: E402
    IMAGE_TOKEN,
    examples_of,
    hf_answers,
    request,
    vllm_answers,
    vllm_engine,
    vllm_run,
)
from tokenprune.demo import checkpoint_path, shapes  # noqa: E402
from tokenprune.errors import BudgetError, MethodArgumentError, SiteError  # noqa: E402

N = 8
RUNNER = Path(__file__).with_name("run_engine.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def examples():
    return shapes("test", N)


@pytest.fixture(scope="module")
def stock_run(examples):
    """The plugin installed, no ``tokenprune`` key."""
    return vllm_run(None, 1.0, examples)


def _subprocess(model: str, method: str, budget: float, n: int, **env) -> dict:
    out = subprocess.run(
        [sys.executable, str(RUNNER), model, method, str(budget), str(n)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


@pytest.mark.parametrize(
    "entry, error, match",
    [
        ({"method": "fastv", "budget": 0.25}, SiteError, "inside the LLM"),
        ({"method": "random", "budget": 2.0}, BudgetError, "budget"),
        ({"method": "random", "budget": 0.25, "sead": 3}, MethodArgumentError, "sead"),
    ],
)
def test_bad_entry_fails_at_engine_start(entry, error, match):
    """In the process that builds the engine, before any model loads. vLLM's ModelConfig is a pydantic
    dataclass, which wraps a ValueError (BudgetError, SiteError) raised while it validates into its
    ValidationError: the message and the typed error it carries are tokenprune's."""
    from vllm import LLM

    with pytest.raises(Exception, match=match) as info:
        LLM(model=str(checkpoint_path("llava")), hf_overrides={"tokenprune": entry}, enforce_eager=True)
    err = info.value
    if type(err).__name__ == "ValidationError":
        err = err.errors()[0]["ctx"]["error"]
    assert isinstance(err, error)


@pytest.mark.parametrize(
    "method, kind",
    [
        ("random", "llava"),
        ("visionzip", "llava"),
        ("pool", "llava"),
        ("visionzip", "llava_next"),
        ("divprune", "llava_next"),
        ("visionzip", "qwen2_5_vl"),
        ("hired", "qwen2_5_vl"),
        ("divprune", "qwen2_5_vl"),
    ],
)
def test_answers_and_kept_sets_equal_the_hf_hooks(method, kind):
    examples = examples_of(kind, N)
    hf = hf_answers(method, 0.25, examples, kind=kind)
    llm = vllm_engine(method, 0.25, kind)
    run = vllm_answers(llm, examples, kind)
    outs = llm.generate(request(examples[0], kind))
    del llm
    gc.collect()
    assert [a.strip() for a in run["answers"]] == [a.strip() for a in hf["answers"]]
    assert sorted(map(tuple, run["kept"][:N])) == sorted(map(tuple, hf["kept"]))
    assert run["lengths"] == hf["lengths"]  # text + kept tokens
    image_token = AutoConfig.from_pretrained(checkpoint_path(kind)).image_token_id
    assert outs[0].prompt_token_ids.count(image_token) == len(hf["kept"][0])
    if kind == "llava":
        assert len(hf["kept"][0]) == round(0.25 * 196)


def test_qwen_budget_one_and_no_key_are_the_unpatched_model():
    """The Qwen fixture cannot be served by vLLM without the plugin (its image-only processor); the plugin
    without a ``tokenprune`` key, and at budget 1.0, answers as transformers' unpatched model does."""
    examples = examples_of("qwen2_5_vl", N)
    hf = hf_answers(None, 1.0, examples, kind="qwen2_5_vl")
    stock = vllm_run(None, 1.0, examples, "qwen2_5_vl")
    full = vllm_run("visionzip", 1.0, examples, "qwen2_5_vl")
    assert [a.strip() for a in stock["answers"]] == [a.strip() for a in hf["answers"]]
    assert stock["lengths"] == hf["lengths"]
    assert full["answers"] == stock["answers"] and full["lengths"] == stock["lengths"]
    assert full["kept"] == []  # nothing selected: the stock code path


@pytest.mark.parametrize(
    "extra, match",
    [({}, "limit_mm_per_prompt"), ({"limit_mm_per_prompt": {"image": 1, "video": 0}, "video_pruning_rate": 0.5},
                                   "video_pruning_rate")],
)
def test_qwen_videos_refused_at_engine_start_while_pruning(extra, match):
    from vllm import LLM

    with pytest.raises(Exception, match=match) as info:
        LLM(model=str(checkpoint_path("qwen2_5_vl")), hf_overrides={"tokenprune": {"method": "random", "budget": 0.25}},
            enforce_eager=True, **extra)
    err = info.value
    if type(err).__name__ == "ValidationError":
        err = err.errors()[0]["ctx"]["error"]
    assert isinstance(err, SiteError)


def test_budget_one_is_stock(stock_run, examples):
    run = vllm_run("uniform", 1.0, examples)
    assert run["answers"] == stock_run["answers"]
    assert run["lengths"] == stock_run["lengths"]
    assert run["kept"] == []  # nothing selected: the stock code path


@pytest.mark.parametrize("kind", ["llava", "qwen2_5_vl"])
def test_chat_template_gives_the_training_prompt(kind):
    from vllm import SamplingParams

    llm = vllm_engine(None, 1.0, kind)
    ex = examples_of(kind, 1)[0]
    msgs = [{"role": "user", "content": [{"type": "image_pil", "image_pil": ex["image"]},
                                         {"type": "text", "text": ex["question"]}]}]
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    chat = llm.chat(msgs, sp, use_tqdm=False)[0]
    plain = llm.generate(request(ex, kind), sp, use_tqdm=False)[0]
    del llm
    gc.collect()
    assert chat.prompt_token_ids == plain.prompt_token_ids  # the fixture's training prompt, <s> included
    assert chat.outputs[0].text == plain.outputs[0].text


def test_plugin_without_key_equals_vllm_without_plugin(stock_run, tmp_path):
    """Stock vLLM (plugin not loaded: VLLM_PLUGINS excludes it) cannot read the fixture's weight names,
    so it gets a copy with the tower keys renamed to the llava-hf layout."""
    from safetensors.torch import load_file, save_file

    src = checkpoint_path("llava")
    dst = tmp_path / "llava_hf_layout"
    shutil.copytree(src, dst)
    weights = load_file(str(src / "model.safetensors"))
    renamed = {(k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k): v
               for k, v in weights.items()}
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    stock = _subprocess(str(dst), "none", 1.0, N, VLLM_PLUGINS="none")
    assert stock["answers"] == stock_run["answers"]
    assert stock["lengths"] == stock_run["lengths"]


def test_entry_point_in_multiprocess_mode(examples):
    """The plugin reaches vLLM's engine-core process only through the vllm.general_plugins entry point."""
    n = 3
    run = _subprocess(str(checkpoint_path("llava")), "hired", 0.25, n, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    hf = hf_answers("hired", 0.25, examples[:n])
    assert [a.strip() for a in run["answers"]] == [a.strip() for a in hf["answers"]]
    assert run["lengths"] == hf["lengths"]


def test_readme_vllm_block_runs():
    """The README's vLLM block (marked not-run for the main suite, which has no vLLM) runs here as written."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Serving at scale with vLLM"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[: code.index("```")]
    scope = {"__name__": "__readme__"}
    exec(compile(code, "README.md (vLLM block)", "exec"), scope)
    assert scope["out"].prompt_token_ids.count(IMAGE_TOKEN) == round(0.25 * 196)
    del scope
    gc.collect()
