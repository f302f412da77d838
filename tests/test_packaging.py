"""The wheel: only ``tokenprune`` at the top of site-packages (the harness and the integrations install as
``tokenprune.evals`` / ``tokenprune.integrations``), the bundled checkpoints inside, and every entry point
naming an object that imports."""

from __future__ import annotations

import configparser
import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """``pip wheel`` of a copy of the package sources (the checkout itself stays untouched)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("tokenprune", "evals", "integrations"):
        shutil.copytree(ROOT / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True)
    (path,) = out.glob("tokenprune_vlm-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_installs_nothing_generic_at_top_level(wheel):
    names = wheel.namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"tokenprune"}
    top = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert wheel.read(top).decode().split() == ["tokenprune"]
    for module in ("tokenprune/cli.py", "tokenprune/evals/cli.py", "tokenprune/evals/demo.py",
                   "tokenprune/integrations/lmms_eval_model.py", "tokenprune/demo/checkpoints/llava/model.safetensors",
                   "tokenprune/vllm/llava.py", "tokenprune/vllm/llava_fixture.jinja"):
        assert module in names, module
    assert not any(n.startswith("tokenprune/evals/fixtures/") for n in names)  # training scripts stay in the repo


def test_entry_points_import(wheel):
    text = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    eps = configparser.ConfigParser()
    eps.read_string(text)
    assert dict(eps["console_scripts"]) == {"tokenprune": "tokenprune.cli:main",
                                            "tokenprune-eval": "tokenprune.evals.cli:main"}
    assert dict(eps["lmms_eval.models"]) == {"tokenprune": "tokenprune.integrations.lmms_eval_model:manifest"}
    assert dict(eps["vllm.general_plugins"]) == {"tokenprune": "tokenprune.vllm:register"}  # imports without vLLM
    for group in ("console_scripts", "lmms_eval.models", "vllm.general_plugins"):
        for target in eps[group].values():
            module, attr = target.split(":")
            assert callable(getattr(importlib.import_module(module), attr)), target
    from tokenprune.integrations.lmms_eval_model import manifest

    assert manifest().model_id == "tokenprune"
