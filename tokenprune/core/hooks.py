"""Installing and removing torch module hooks, and normalising hook arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

_PARAMS: dict[Any, list[str]] = {}


def _names(module: nn.Module) -> list[str]:
    fn = type(module).forward
    names = _PARAMS.get(fn)
    if names is None:
        names = [p for p in inspect.signature(fn).parameters if p != "self"]
        _PARAMS[fn] = names
    return names


def bind(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Merge a forward call's positional ``args`` into ``kwargs`` by parameter name, so hooks see
    one calling convention (LLaVA passes ``input_ids`` by keyword, LLaVA-NeXT positionally; ViT and
    CLIP layers get ``hidden_states, attention_mask`` positionally)."""
    if not args:
        return dict(kwargs)
    return {**dict(zip(_names(module), args)), **kwargs}


def unbind(module: nn.Module, n_positional: int, bound: dict) -> tuple[tuple, dict]:
    """Inverse of :func:`bind`: the first ``n_positional`` parameters go back to positional
    arguments (other hooks, such as transformers' output capturing, read ``args[0]``)."""
    names = _names(module)[:n_positional]
    rest = dict(bound)
    return tuple(rest.pop(n) for n in names), rest


class HookSet:
    """The hooks of one patch; ``remove()`` takes every one of them off."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._undo: list[Callable[[], None]] = []

    def pre(self, module: nn.Module, fn: Callable[[nn.Module, dict], dict | None]) -> None:
        """Forward pre-hook that receives all arguments as one kwargs dict and may return a new one."""

        def hook(mod: nn.Module, args: tuple, kwargs: dict):
            new = fn(mod, bind(mod, args, kwargs))
            return None if new is None else unbind(mod, len(args), new)

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def post(self, module: nn.Module, fn: Callable[[nn.Module, dict, Any], Any]) -> None:
        """Forward hook that receives the bound kwargs and the output."""

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any):
            return fn(mod, bind(mod, args, kwargs), output)

        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def setattr(self, obj: object, name: str, value: object) -> None:
        """Set an instance attribute (shadowing the class's) until ``remove()``."""
        had = name in obj.__dict__
        old = obj.__dict__.get(name)
        object.__setattr__(obj, name, value)

        def undo() -> None:
            if had:
                object.__setattr__(obj, name, old)
            else:
                obj.__dict__.pop(name, None)

        self._undo.append(undo)

    def __len__(self) -> int:
        return len(self._handles) + len(self._undo)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for undo in reversed(self._undo):
            undo()
        self._handles.clear()
        self._undo.clear()
