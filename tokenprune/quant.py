"""LLM.int8() matmuls (Dettmers et al., NeurIPS 2022) through bitsandbytes, combinable with every
token-reduction method.

``quantize_int8(model)`` replaces ``nn.Linear`` layers in place with ``bitsandbytes.nn.Linear8bitLt``
(``has_fp16_weights=False``): weights are stored as int8 with one absmax scale per output row
(``SCB``, float32); in the forward, activations are quantised row-wise to int8, and every input
column holding a value with ``|x| >= threshold`` is an *outlier column* that bypasses int8 and is
multiplied in the input's precision against the dequantised weight columns (the mixed-precision
decomposition). ``threshold=0`` gives pure int8 without the decomposition.

Token reduction and int8 are independent: pruning hooks act on decoder layers and attention modules,
int8 replaces the linears inside them. ``tokenprune.patch(model, ..., int8=True)`` does both;
``handle.remove()`` takes the token patch off and **leaves the int8 layers in place** (the fp weights
are gone: reload the model to get them back). Models loaded by transformers with
``BitsAndBytesConfig(load_in_8bit=True)`` already hold ``Linear8bitLt`` layers and work with every
method as they are; quantising such a model (or quantising twice) converts nothing that is int8
already and never re-quantises.

Which layers: with ``include_vision=False`` only the language model's linears (its decoder layers
and, unless listed in ``skip``, its output head); with ``include_vision=True`` every ``nn.Linear`` of
the model (vision tower and projector too). A standalone encoder (ViT / CLIP / SigLIP) *is* its
vision stack: the linears of its encoder layers are converted whatever ``include_vision`` says, and
heads or projections outside those layers keep their dtype. Layers named in ``skip`` are left
untouched, in their original dtype.

Inference only (the converted layers hold frozen int8 weights). Change the model's dtype or device
*before* quantising: ``.to(dtype)`` afterwards would cast the int8 codes. Works on CPU
(bitsandbytes >= 0.46) and CUDA (compute capability >= 7.5). On CPUs without AVX-512 bitsandbytes
runs the int8 GEMM in fp32, which saves memory but not time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import anatomy_of
from .errors import MissingDependencyError, QuantizationError

DEFAULT_THRESHOLD = 6.0
INSTALL_HINT = "pip install 'tokenprune-vlm[int8]'  (or: pip install 'bitsandbytes>=0.46')"
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def require_bitsandbytes(cpu: bool = False):
    """Import and return ``bitsandbytes``, or raise :class:`MissingDependencyError` saying what to
    install. ``cpu=True`` also requires a version with the CPU int8 kernels (>= 0.46)."""
    try:
        import bitsandbytes
    except ImportError as exc:  # also raised for a broken install
        raise MissingDependencyError(
            f"int8: LLM.int8() needs bitsandbytes, which is not installed; {INSTALL_HINT}"
        ) from exc
    if cpu and _version(bitsandbytes.__version__) < (0, 46):
        raise MissingDependencyError(
            f"int8: bitsandbytes {bitsandbytes.__version__} has no CPU int8 kernels; CPU needs >= 0.46; {INSTALL_HINT}"
        )
    return bitsandbytes


def check_int8_flag(int8: bool) -> None:
    """Validate ``patch(..., int8=)``: a bool, and with True bitsandbytes must be importable."""
    if not isinstance(int8, bool):
        raise QuantizationError(f"int8: expected True or False, got {int8!r}")
    if int8:
        require_bitsandbytes()


def _version(text: str) -> tuple[int, int]:
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in text.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def is_int8(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear8bitLt`` (ours or transformers'); no import needed."""
    return any(cls.__name__ == "Linear8bitLt" for cls in type(module).__mro__)


def _is_quantized_linear(module: nn.Module) -> bool:
    """Any bitsandbytes / quantised linear (8-bit, 4-bit, ...): never converted again."""
    names = {cls.__name__ for cls in type(module).__mro__}
    weight = getattr(module, "weight", None)
    return (
        bool(names & {"Linear8bitLt", "Linear4bit", "LinearFP4", "LinearNF4", "Int8Params", "Params4bit"})
        or (isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point)
    )


def int8_state(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CB, SCB)`` of a ``Linear8bitLt``: int8 weight codes (out, in) and per-row scales (out,).
    bitsandbytes keeps them on the weight until the first forward, on ``module.state`` after."""
    state = module.state
    cb = state.CB if state.CB is not None else getattr(module.weight, "CB", None)
    scb = state.SCB if state.SCB is not None else getattr(module.weight, "SCB", None)
    if cb is None:
        cb = module.weight.data
    if scb is None:
        raise QuantizationError(f"int8: {type(module).__name__} holds no int8 scales (not quantised yet?)")
    return cb, scb


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a linear's weight as stored, measured from the tensors: for ``Linear8bitLt`` the
    int8 codes plus the scales; otherwise the weight tensor itself (bias not included)."""
    if is_int8(module):
        cb, scb = int8_state(module)
        return cb.numel() * cb.element_size() + scb.numel() * scb.element_size()
    w = module.weight
    return w.numel() * w.element_size()


@dataclass
class Int8Summary:
    """What :func:`quantize_int8` did: qualified names of the linears it ``converted`` now, those in
    scope that were int8 ``already`` (left as they are) and those ``skipped`` (kept in their dtype)."""

    converted: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD

    def __repr__(self) -> str:
        return (
            f"Int8Summary(converted={len(self.converted)}, already={len(self.already)}, "
            f"skipped={len(self.skipped)}, threshold={self.threshold})"
        )


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """``pattern`` matches a run of whole dotted components of ``name`` ("lm_head",
    "mlp.down_proj", "layers.0")."""
    dotted = f".{name}."
    return any(f".{p.strip('.')}." in dotted for p in patterns)


def _scope(model: nn.Module, include_vision: bool) -> list[nn.Module]:
    """The modules whose linears are in scope (found through the adapter, not dotted paths)."""
    anatomy = anatomy_of(model)
    if not anatomy.is_vlm:
        return [anatomy.vision.layers]
    if include_vision:
        return [model]
    roots: list[nn.Module] = [anatomy.llm.layers]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        roots.append(head)
    return roots


def _check_args(threshold: float, skip, include_vision: bool) -> tuple[float, tuple[str, ...]]:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise QuantizationError(f"threshold: expected a number >= 0 (0 disables outlier columns), got {threshold!r}")
    if isinstance(skip, str):
        skip = (skip,)
    if not all(isinstance(s, str) and s for s in skip):
        raise QuantizationError(f"skip: expected module names (strings), got {skip!r}")
    if not isinstance(include_vision, bool):
        raise QuantizationError(f"include_vision: expected True or False, got {include_vision!r}")
    return float(threshold), tuple(skip)


class _RepeatFilter(logging.Filter):
    """Let bitsandbytes' "inputs will be cast ... to float16" warning through once per dtype instead
    of on every matmul (it fires for each linear of each forward when the model is not fp16)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("MatMul8bitLt: inputs will be cast"):
            return True
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def _quiet_cast_warning() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _RepeatFilter) for f in logger.filters):
        logger.addFilter(_RepeatFilter())


def _check_weight(linear: nn.Linear, name: str) -> None:
    """Refuse before converting anything: offloaded weights, or weights fp16 cannot hold."""
    w = linear.weight.detach()
    if w.device.type == "meta":
        raise QuantizationError(f"int8: {name}.weight is on the meta device (offloaded?); load it first")
    lo, hi = torch.aminmax(w)
    if not (torch.isfinite(lo) and torch.isfinite(hi) and max(-float(lo), float(hi)) <= 65504.0):
        raise QuantizationError(
            f"int8: {name}.weight does not fit in float16 (bitsandbytes quantises from fp16); add it to skip="
        )


def _convert(bnb, linear: nn.Linear, threshold: float) -> nn.Module:
    # What Int8Params._quantize does on .to(device), but on the weight's own device (CUDA included).
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(linear.weight.detach().to(torch.float16).contiguous())
    new = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=threshold,
        device="meta",
    )
    new.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)  # original dtype and device
    new.train(linear.training)  # bitsandbytes takes a dequantising fp path in training mode on CPU
    for attr in _HOOK_DICTS:  # hooks registered on the old linear keep firing (and stay removable)
        if attr in linear.__dict__:
            object.__setattr__(new, attr, linear.__dict__[attr])
    return new


def _held(places: list[tuple[nn.Module, str]]) -> nn.Module:
    parent, name = places[0]
    return parent._modules[name]


def quantize_int8(
    model: nn.Module,
    threshold: float = DEFAULT_THRESHOLD,
    skip: tuple[str, ...] | list[str] = ("lm_head",),
    include_vision: bool = False,
) -> Int8Summary:
    """Replace ``model``'s ``nn.Linear`` layers in place with LLM.int8() ``Linear8bitLt`` layers.

    Args:
        model: a supported model (``tokenprune.adapters.SUPPORTED``), on CPU or CUDA, in its final
            dtype (fp32, fp16 or bf16; the int8 layers return the input's dtype).
        threshold: activation magnitude from which an input column takes the high-precision outlier
            path (6.0, as in the paper and transformers' ``llm_int8_threshold``); 0 for pure int8.
        skip: module names left in their original dtype; a name matches whole dotted components of
            a qualified module name ("lm_head", "mlp.down_proj", "layers.0").
        include_vision: also convert the vision tower and projector of a VLM (every ``nn.Linear``);
            by default only the language model. No effect on a standalone encoder (its encoder
            layers are converted).

    Layers that are int8 already (a second call, or ``load_in_8bit``) are left as they are, with
    their own threshold: never converted twice. Returns an :class:`Int8Summary`.
    """
    threshold, skip = _check_args(threshold, skip, include_vision)
    roots = _scope(model, include_vision)
    in_scope = {id(m) for root in roots for m in root.modules()}
    names: dict[int, str] = {}
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent_name, parent in model.named_modules():
        for child_name, child in parent._modules.items():  # every name a linear is held under
            if child is not None and id(child) in in_scope and isinstance(child, nn.Linear):
                names.setdefault(id(child), f"{parent_name}.{child_name}" if parent_name else child_name)
                parents.setdefault(id(child), []).append((parent, child_name))
    if not parents:
        raise QuantizationError(f"int8: no linear layer in scope in this {type(model).__name__}")
    summary = Int8Summary(threshold=threshold)
    todo = []
    for key, name in names.items():
        if _matches(name, skip):
            summary.skipped.append(name)
        elif _is_quantized_linear(_held(parents[key])):
            summary.already.append(name)
        else:
            todo.append(key)
    if todo:
        devices = {_held(parents[k]).weight.device.type for k in todo}
        bnb = require_bitsandbytes(cpu="cpu" in devices)
        for key in todo:  # all checks first: a refused model is left untouched
            _check_weight(_held(parents[key]), names[key])
        for key in todo:
            places = parents.pop(key)
            new = _convert(bnb, _held(places), threshold)
            for parent, child_name in places:  # a linear shared by two parents is replaced in both
                setattr(parent, child_name, new)
            summary.converted.append(names[key])
    if summary.converted or summary.already:
        _quiet_cast_warning()
    return summary


__all__ = [
    "DEFAULT_THRESHOLD",
    "Int8Summary",
    "check_int8_flag",
    "int8_state",
    "is_int8",
    "quantize_int8",
    "require_bitsandbytes",
    "weight_bytes",
]
