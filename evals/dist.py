"""Data parallelism under ``accelerate launch`` (or none): rank, world size, barrier, device."""

from __future__ import annotations

import os
from typing import Any


class Dist:
    """The process group of this run. Without ``accelerate launch`` it is a single process.

    Docs are sharded ``i % world == rank``; each rank writes its records to a part file, and the main
    process merges them after :meth:`barrier`. On CPU the processes form a gloo group: launch them with
    ``accelerate launch --multi_gpu --num_processes N -m evals --device cpu ...`` (accelerate's torchrun
    launcher; its ``--cpu`` flag alone starts one process unless given an mpirun hostfile) or with
    ``torchrun --nproc_per_node N -m evals ...``.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.state: Any = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=str(device).startswith("cpu"))
        self.rank = self.state.process_index if self.state else 0
        self.world = self.state.num_processes if self.state else 1
        self.local_rank = self.state.local_process_index if self.state else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def device(self, requested: str) -> str:
        """``cuda`` becomes this process's GPU under data parallelism; other devices stay as given."""
        if requested == "cuda" and self.world > 1:
            return f"cuda:{self.local_rank}"
        return requested

    def shard(self, n: int) -> list[int]:
        """Indices of the docs this process runs."""
        return [i for i in range(n) if i % self.world == self.rank]
