"""Registered token-reduction methods."""

from . import baselines, fastv  # noqa: F401  (registration)
from .base import REGISTRY, Method, build, register
from .baselines import Random, Uniform
from .fastv import FastV

__all__ = ["REGISTRY", "Method", "build", "register", "Random", "Uniform", "FastV"]
