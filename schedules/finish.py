"""The passes that finish our scheduled kernels, wherever they are compiled (a build's
compile pipeline, the tuner's builder): what a schedule marks and TVM's schedule
primitives cannot express (``finish_kernels``, on scheduled TIR), and what TVM's
lowering does not do for them (``tir_pipeline``, the TIR pipeline to compile them
with)."""

from __future__ import annotations

from .epilogue_prefetch import insert_epilogue_prefetch
from .overlapped_vectors import overlap_last_vector
from .padded_rows import clamp_padded_rows
from .prefetch import insert_panel_prefetch
from .stack_locals import keep_locals_on_stack

TIR_PIPELINE = "xcompile"


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


def tir_pipeline() -> str:
    """The name of the TIR pipeline (``tvm.compile(..., tir_pipeline=...)``) that
    compiles our kernels, registered with TVM on first use: TVM's default (``s_tir``)
    with the register-sized local buffers kept on the stack (``stack_locals``) before
    its host code's builtins are lowered."""
    import tvm
    from tvm.tirx import compilation_pipeline as pipelines

    if TIR_PIPELINE not in pipelines.PIPELINE_MAP:
        def _pipeline(**kwargs):
            lower, finalize_host, finalize_device = pipelines.get_tir_pipeline("s_tir",
                                                                              **kwargs)

            def _finalize_host():
                return tvm.transform.Sequential([keep_locals_on_stack(), finalize_host()])

            return lower, _finalize_host, finalize_device

        pipelines.register_tir_pipeline(TIR_PIPELINE, _pipeline)
    return TIR_PIPELINE
