"""One vLLM engine in a fresh process (for the tests that need one): greedy answers and prompt lengths of
the first N shapes test examples as JSON on the stdout line that starts with RESULT.

python tests/vllm_plugin/run_engine.py MODEL_DIR METHOD|none BUDGET N [chat]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from evals.vllm_agreement import vllm_answers, vllm_engine  # noqa: E402
from tokenprune.demo import shapes  # noqa: E402

if __name__ == "__main__":
    model, method, budget, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    llm = vllm_engine(None if method == "none" else method, budget, model=model)
    run = vllm_answers(llm, shapes("test", n))
    print("RESULT", json.dumps({"answers": run["answers"], "lengths": run["lengths"]}), flush=True)
