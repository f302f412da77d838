"""Typed errors. Every class subclasses ``ValueError`` or ``TypeError`` so callers can catch the
standard exceptions, and every message names the offending parameter and what is allowed."""

from __future__ import annotations


class TokenPruneError(Exception):
    """Base class of all tokenprune errors."""


class UnknownMethodError(TokenPruneError, ValueError):
    """``method=`` names no registered method."""


class BudgetError(TokenPruneError, ValueError):
    """``budget`` outside (0, 1], or not reachable by the method on this model. ``minimum`` is the bound the
    budget must exceed when the budget was unreachable (None otherwise)."""

    def __init__(self, message: str, minimum: float | None = None) -> None:
        super().__init__(message)
        self.minimum = minimum


class MethodArgumentError(TokenPruneError, TypeError):
    """A method received an argument it does not take, or an invalid value for one."""


class UnsupportedModelError(TokenPruneError, TypeError):
    """The model is none of the architectures tokenprune has an adapter for."""


class SiteError(TokenPruneError, ValueError):
    """The method acts at a site (vision layer, before the LLM, LLM layer) the model lacks, or at a
    layer index outside the model."""


class AttentionBackendError(TokenPruneError, ValueError):
    """The model's attention implementation cannot serve what the method needs."""


class NoMatchError(TokenPruneError, ValueError):
    """A patch would install no hook: never a silent no-op."""


class MissingDependencyError(TokenPruneError, ImportError, ValueError):
    """An option needs an optional dependency that is not installed (``int8=True`` needs
    bitsandbytes); the message says what to install. Also an ``ImportError``."""


class QuantizationError(TokenPruneError, ValueError):
    """``quantize_int8`` / ``int8=`` received an invalid argument, or the model cannot be quantised."""


class UnsupportedPathError(TokenPruneError, ValueError):
    """A ``generate()`` / forward option a patch cannot serve exactly (chunked prefill, a static
    KV cache, images in a step that continues a cache); the message names the option and what to
    use instead. Raised before the path computes anything wrong."""


class PatchedModelError(TokenPruneError, TypeError):
    """An operation on a patched model that the patch cannot follow (pickling / ``torch.save`` of
    the module, a second patch nested inside or around an existing one); the message says what to do."""
