"""``accelerate launch`` with 2 CPU processes gives the same accuracy and predictions as 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import eval_helpers
import pytest

# two fresh processes import torch + transformers and load the model: > 30 s on 2 shared cores; deselected by
# default (pyproject addopts), run with: python3 -m pytest -p no:cacheprovider -m slow tests
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_processes_match_one(tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    model = eval_helpers.save_tiny(tmp_path / "llava")
    common = ["--model", str(model), "--task", "shapes", "--methods", "none,random,fastv", "--budgets", "0.5",
              "--limit", "10", "--latency-samples", "0", "--overlays", "0", "--no-progress", "--threads", "1"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _run([sys.executable, "-m", "evals", *common, "--out", str(tmp_path / "one")], repo)
    # accelerate's torchrun launcher ("--multi_gpu") also starts CPU processes; --device cpu makes them gloo
    _run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "evals", *common, "--out", str(tmp_path / "two")],
         repo)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["run"]["world_size"] == 2 and one["run"]["world_size"] == 1
    for a, b in zip(one["cells"], two["cells"]):
        assert (a["method"], a["budget"]) == (b["method"], b["budget"])
        assert a["metrics"] == b["metrics"]
        assert a["flops_macs"] == pytest.approx(b["flops_macs"])
        cell = f"{a['method']}@{'full' if a['budget'] is None else a['budget']}.json"
        ra = json.loads((tmp_path / "one" / "cells" / "shapes" / cell).read_text())["records"]
        rb = json.loads((tmp_path / "two" / "cells" / "shapes" / cell).read_text())["records"]
        assert [r["prediction"] for r in ra] == [r["prediction"] for r in rb]
