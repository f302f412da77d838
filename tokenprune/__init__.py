"""tokenprune: faster vision-language models by processing fewer visual tokens.

handle = tokenprune.patch(model, method="fastv", budget=0.25)
model.generate(**inputs)
handle.trace          # what the last prefill kept
handle.remove()       # the original model again
"""

from . import errors
from .api import PatchHandle, handle_of, method, methods, patch, unpatch
from .core.stage import Context, Stage
from .core.trace import StageRecord, Trace
from .methods import FastV, Method, Random, Uniform, register
from .quant import quantize_int8

__version__ = "0.1.0"

__all__ = [
    "patch",
    "unpatch",
    "handle_of",
    "method",
    "methods",
    "PatchHandle",
    "Trace",
    "StageRecord",
    "Stage",
    "Context",
    "Method",
    "register",
    "FastV",
    "Random",
    "Uniform",
    "errors",
    "quantize_int8",
]
