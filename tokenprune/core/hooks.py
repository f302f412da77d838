"""Installing and removing torch module hooks, and normalising hook arguments."""

from __future__ import annotations

import copy
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
        self._hooked: list[nn.Module] = []  # the module of each handle
        self._attrs: list[tuple[object, str, bool, object]] = []  # (obj, name, had an instance value, that value)

    def pre(self, module: nn.Module, fn: Callable[[nn.Module, dict], dict | None]) -> None:
        """Forward pre-hook that receives all arguments as one kwargs dict and may return a new one."""

        def hook(mod: nn.Module, args: tuple, kwargs: dict):
            new = fn(mod, bind(mod, args, kwargs))
            return None if new is None else unbind(mod, len(args), new)

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        self._hooked.append(module)

    def post(self, module: nn.Module, fn: Callable[[nn.Module, dict, Any], Any]) -> None:
        """Forward hook that receives the bound kwargs and the output."""

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any):
            return fn(mod, bind(mod, args, kwargs), output)

        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        self._hooked.append(module)

    def setattr(self, obj: object, name: str, value: object) -> None:
        """Set an instance attribute (shadowing the class's) until ``remove()``."""
        self._attrs.append((obj, name, name in obj.__dict__, obj.__dict__.get(name)))
        object.__setattr__(obj, name, value)

    def __len__(self) -> int:
        return len(self._handles) + len(self._attrs)

    def modules(self) -> list[object]:
        """The objects these hooks and attributes sit on."""
        return self._hooked + [obj for obj, *_ in self._attrs]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for obj, name, had, old in reversed(self._attrs):
            _restore(obj, name, had, old)
        self._handles.clear()
        self._hooked.clear()
        self._attrs.clear()

    def strip_copy(self, memo: dict) -> None:
        """In a ``copy.deepcopy`` made with ``memo``, take these hooks and attributes off the copies
        of the modules they sit on (the copies' hook callables still point at the originals)."""
        for h in self._handles:
            for ref in (h.hooks_dict_ref, *getattr(h, "extra_dict_ref", ())):
                hooks = memo.get(id(ref()))
                if hooks is not None:
                    hooks.pop(h.id, None)
        for obj, name, had, old in reversed(self._attrs):
            clone = memo.get(id(obj))
            if clone is not None:
                _restore(clone, name, had, copy.deepcopy(old, memo))


def _restore(obj: object, name: str, had: bool, old: object) -> None:
    if had:
        object.__setattr__(obj, name, old)
    else:
        obj.__dict__.pop(name, None)
