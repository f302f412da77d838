"""Registered token-reduction methods."""

from . import baselines, fastv, feather, pyramiddrop  # noqa: F401  (registration)
from .base import REGISTRY, Method, build, register
from .baselines import Random, Uniform
from .cdpruner import CDPruner as CDPruner  # registration
from .cluster import Cluster as Cluster  # registration
from .dart import DART as DART  # registration
from .divprune import DivPrune as DivPrune  # registration
from .early_exit import EarlyExit as EarlyExit  # registration
from .fastv import FastV
from .feather import Feather
from .hired import HiRED as HiRED  # registration
from .pool import Pool as Pool  # registration
from .pyramiddrop import PyramidDrop
from .tome import ToMe as ToMe  # registration
from .visionzip import VisionZip as VisionZip  # registration
from .vispruner import VisPruner as VisPruner  # registration

__all__ = ["REGISTRY", "Method", "build", "register", "Random", "Uniform", "FastV", "PyramidDrop", "Feather"]
