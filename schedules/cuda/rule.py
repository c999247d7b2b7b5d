"""What the CUDA rules share: a schedule whose thread bindings can be left out.

Without a GPU, a CUDA schedule's arithmetic (tiling, padding, im2col indices, the fused
epilogue) is still checkable: the same loop nest with no loop bound to a thread is an
ordinary serial program that an LLVM build runs on the CPU. Shared-memory fetches stay
correct when serialized, because each fetch sits inside the loops that were threads.
"""

from __future__ import annotations

from ..rule import ConfigRule


class GPURule(ConfigRule):
    """A ``ConfigRule`` whose ``schedule`` binds loops through ``self.bind``."""

    def __init__(self, bind_threads: bool = True):
        self.bind_threads = bind_threads

    def bind(self, sch, loop, axis: str) -> None:
        """Bind ``loop`` to ``axis`` (blockIdx.x, threadIdx.y...), unless emulating."""
        if self.bind_threads:
            sch.bind(loop, axis)

    @classmethod
    def unbound(cls) -> GPURule:
        """The rule with the same schedules but no thread bindings: they build for the
        CPU, so tests can compare them with the unscheduled computation."""
        return cls(bind_threads=False)
