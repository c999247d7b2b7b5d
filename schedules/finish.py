"""The passes that finish our scheduled kernels, wherever they are compiled (a build's
compile pipeline, the tuner's builder): what a schedule marks and TVM's schedule
primitives cannot express."""

from __future__ import annotations

from .epilogue_prefetch import insert_epilogue_prefetch
from .overlapped_vectors import overlap_last_vector
from .padded_rows import clamp_padded_rows
from .prefetch import insert_panel_prefetch


def finish_kernels():
    """One pass: overlapping last vectors (``overlapped_vectors``), clamped reads for
    padded rows (``padded_rows``), then the weight-panel prefetches (``prefetch``) and
    the write-back prefetches (``epilogue_prefetch``); all leave unmarked kernels as
    they are."""
    import tvm

    return tvm.transform.Sequential([overlap_last_vector(), clamp_padded_rows(),
                                     insert_panel_prefetch(),
                                     insert_epilogue_prefetch()],
                                    name="xcompile.FinishKernels")
