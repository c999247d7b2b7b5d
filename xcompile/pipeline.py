"""Graph passes and scheduling: the Relax module from the front end becomes a deployable
``main`` whose every kernel is scheduled for the target, plus the weight transforms that
run once, at build time.

Stages, in order:
1. graph passes: inference-only decomposition (batch norm), the layout the target
   family's schedules are written for (NHWC for CPUs), the 3x3 convs the family's
   Winograd rule takes as Winograd convolutions (``xcompile.winograd``), and lifting of
   every computation on weights alone (layout changes of the weights) out of ``main``;
2. lowering: operator legalization to TIR, constant folding, and fusion of each heavy op
   with the elementwise ops after it (the "zero" pipeline of ``relax.pipeline``);
3. scheduling: each kernel gets the first matching rule of the family from
   ``schedules``; kernels no rule matches keep TVM's default lowering;
4. weight packing: layout-rewrite blocks the rules placed on weights (packed GEMM
   panels, Winograd's kernel transform) are split out of the kernels and lifted like
   stage 1's transforms.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

# The function relax.transform.LiftTransformParams makes of the weights' computations.
from xcompile.runtime import LIFTED

log = logging.getLogger(__name__)


@dataclass
class Optimized:
    """The result of :func:`optimize`.

    ``mod`` holds ``main(input, *weights)``; ``weight_stages`` are modules whose
    ``main_transform_params`` maps a tuple of weights to the next stage's, the last to
    the tuple ``mod``'s main takes; ``kernels`` maps kernel names to the rule that scheduled each,
    ``work`` to their kind and FLOPs per call.
    """

    mod: object
    weight_stages: list
    kernels: dict[str, str]
    work: dict[str, tuple[str, float]]  # kernel name -> (kind, FLOPs per call)


def _lift_weights(mod):
    """Split ``mod`` into (main with transformed weights, module of the transform)."""
    import tvm
    from tvm import relax

    mod = tvm.IRModule(dict(mod.functions_items()))
    mod["main"] = mod["main"].with_attr("num_input", 1)
    mod = relax.transform.LiftTransformParams()(mod)
    dce = relax.transform.DeadCodeElimination
    # Keep the GlobalVar objects: function bodies refer to them, not to names. The stage
    # takes only what the transform calls (DCE keeps unreferenced PrimFuncs, and those
    # may be scheduled for a GPU while the stage runs on this CPU).
    lifted_gv = mod.get_global_var(LIFTED)
    called = {lifted_gv}
    relax.analysis.post_order_visit(
        mod[LIFTED], lambda e: called.add(e) if isinstance(e, tvm.ir.GlobalVar) else None)
    stage = tvm.IRModule({gv: mod[gv] for gv in called})
    # ``num_input`` stays: it tells later passes which of main's parameters are
    # weights, static between calls (RewriteCUDAGraph captures only what depends on them).
    main_only = tvm.IRModule({gv: f for gv, f in dce(["main"])(mod).functions_items()
                              if gv.name_hint != LIFTED})
    return main_only, stage


PRECISIONS = ("fp32", "fp16")


def graph_passes(layout: dict | None, precision: str = "fp32", tile_batch_bytes: int = 0,
                 winograd=None):
    """Relax passes, with ``layout`` (ConvertLayout's format) applied, the layers
    holding maps over ``tile_batch_bytes`` run on slices of the batch (``batch_tiling``;
    0: never), and the 3x3 convs that ``winograd`` (a rule's ``tile_multiple`` for the
    target; None: none) takes computed by Winograd's algorithm (``xcompile.winograd``;
    after the slicing, which re-infers the sliced operators' shapes).

    ``fp16``: mixed precision (Relax's ToMixedPrecision): convolutions and matmuls take
    float16 operands and accumulate in float32, the model's inputs and outputs stay
    float32, and the weights' casts are lifted with the other weight transforms, so
    ``params.bin`` holds float16 weights.
    """
    import tvm
    from tvm import relax

    from xcompile.batch_norm_folding import fold_batch_norm
    from xcompile.batch_tiling import tile_batch
    from xcompile.clip_recovery import recover_clip
    from xcompile.leaky_relu import rewrite_leaky_relu
    from xcompile.winograd import winograd_convs

    t = relax.transform
    passes = [fold_batch_norm(), recover_clip(), rewrite_leaky_relu(),
              t.DecomposeOpsForInference(), t.CanonicalizeBindings()]
    if layout:
        passes += [t.ConvertLayout(layout), t.Normalize(), t.CanonicalizeBindings()]
    # After the layout: the weights' layout transforms, once, ahead of every slice (on
    # the graph before it, each slice's convs got their own: 8 copies of the weights).
    passes.append(tile_batch(tile_batch_bytes))
    if precision == "fp16":
        passes += [t.ToMixedPrecision(out_dtype="float32"), t.CanonicalizeBindings()]
    if winograd is not None:
        passes.append(winograd_convs(winograd))
    return tvm.transform.Sequential(passes, name="xcompile.GraphPasses")


def _relu(bb, call):
    """ReLU as ``x < 0 ? 0 : x``: a NaN stays NaN, as in ONNX Runtime. (TVM's own,
    ``max(x, 0)``, becomes LLVM's maxnum, which returns 0 for a NaN.)"""
    from tvm import te, tirx

    def compute(x):
        zero = tirx.const(0, x.dtype)
        return te.compute(x.shape, lambda *i: tirx.Select(x(*i) < zero, zero, x(*i)),
                          name="relu", tag="elemwise")

    return bb.call_te(compute, call.args[0], primfunc_name_hint="relu")


def lowering_passes(polynomials: bool = False):
    """Legalize to TIR and fuse: Relax's zero pipeline (LegalizeOps, AnnotateTIROpPattern,
    FoldConstant, FuseOps, FuseTIR), then dead code elimination. ReLU is legalized first,
    our way (``_relu``), and with ``polynomials`` (devices whose exp is a scalar library
    call) exp, sigmoid, erf, tanh and the activations made of them as vectorizable
    polynomials (``polynomial_math``)."""
    import tvm
    from tvm import relax

    from xcompile import polynomial_math

    ours = {"relax.nn.relu": _relu}
    if polynomials:
        ours.update(polynomial_math.legalizations())
    return tvm.transform.Sequential(
        [relax.transform.LegalizeOps(customize_legalize_map=ours), relax.get_pipeline("zero"),
         relax.transform.DeadCodeElimination()], name="xcompile.Lowering")


COMPILE_PIPELINE = "xcompile"


def compile_pipeline(preset):
    """The Relax pipeline ``tvm.compile`` runs on an optimized module for ``preset``,
    registered with ``relax.register_pipeline`` as ``"xcompile"``: the pass that
    finishes our scheduled kernels (``schedules.finish_kernels``), then the phases
    of TVM's own pipeline for the preset's backend (library dispatch; dataflow lowering;
    finalization: memory planning, CUDA graph capture, VM lowering), without its
    legalization phase, which on GPUs applies DLight's default schedules: our kernels
    arrive legalized and scheduled. (The phases come from the backend's ``pipeline``
    module: TVM 0.27's ``relax.pipeline.dataflow_lower_passes`` looks for them in the
    backend package, which does not export them.)"""
    import importlib

    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    if COMPILE_PIPELINE not in relax_pipeline.PIPELINE_MAP:
        @relax.register_pipeline(COMPILE_PIPELINE)
        def _xcompile(target, backend: str):
            import tvm

            phases = importlib.import_module(f"tvm.relax.backend.{backend}.pipeline")

            from xcompile import schedules

            @tvm.transform.module_pass(opt_level=0, name="xcompile.Compile")
            def _pipeline(mod, _ctx):
                with target:
                    return tvm.transform.Sequential(
                        [schedules.finish_kernels()]
                        + phases.library_dispatch_passes(target)
                        + phases.dataflow_lower_passes(target)
                        + phases.finalize_passes(target))(mod)

            return _pipeline

    return relax.get_pipeline(COMPILE_PIPELINE, target=preset.tvm_target(),
                              backend=preset.device_kind.relax_backend)


def lower(mod, preset, custom_schedules: bool = True, precision: str = "fp32",
          fuse_separable: bool = False, winograd: bool = True):
    """Stages 1-2 for ``preset``: ``(lowered module, weight stage)``. The lowered
    module's PrimFuncs are what the rules schedule and what the tuner tunes; with our
    schedules, an activation only a depthwise conv reads is computed in that conv
    (``activation_fusion``). ``fuse_separable``: depthwise -> pointwise kernel pairs
    become one kernel, for the families whose rules schedule those. ``winograd``: the
    3x3 convs the family's Winograd rule takes are computed that way (False: every conv
    direct, as a comparison or a test of the direct rules needs)."""
    from xcompile import schedules
    from xcompile.activation_fusion import fuse_input_activations
    from xcompile.separable_fusion import fuse_separable as fusion

    layout = schedules.layout_for(preset.family) if custom_schedules else None
    rule = schedules.winograd_rule(preset.family) if custom_schedules and winograd else None
    with preset.tvm_target() as target:
        choose = rule and (lambda out, weight: rule.tile_multiple(out, weight, target))
        mod = graph_passes(layout, precision,
                           preset.tile_batch_bytes if custom_schedules else 0, choose)(mod)
        mod, graph_stage = _lift_weights(mod)
        mod = lowering_passes(custom_schedules
                              and preset.device_kind.scalar_transcendentals)(mod)
        if custom_schedules:
            mod = fuse_input_activations()(mod)
        if custom_schedules and fuse_separable and schedules.fuses_separable(preset.family):
            rule, target = schedules.separable_rule(preset.family), preset.tvm_target()
            mod = fusion(lambda func: rule.apply(func, target) is not None)(mod)
    return mod, graph_stage


def optimize(mod, preset, custom_schedules: bool = True, tuned=None,
             precision: str = "fp32", fuse_separable: bool = False) -> Optimized:
    """Run the stages above for ``preset``; ``custom_schedules=False`` keeps the model's
    layout and TVM's baseline schedules (the plain path, for comparison). ``tuned``
    (an ``xcompile.tuning.TunedKernels``) schedules the kernels it has records for,
    before the rules take the rest."""
    from tvm import relax

    from xcompile import schedules

    family = preset.family
    rules = (schedules.rules_for(family) if custom_schedules
             else schedules.baseline_rules_for(family))
    if preset.device_kind.tensorizes:
        schedules.register_tensor_intrinsics(preset.device)
    mod, graph_stage = lower(mod, preset, custom_schedules, precision, fuse_separable)
    with preset.tvm_target():
        mod = schedules.annotate_work()(mod)
        if tuned is not None:
            mod = tuned.apply_pass()(mod)
        mod = schedules.apply_rules(rules)(mod)
        mod = relax.transform.SplitLayoutRewritePreproc()(mod)
        # The split packs a weight at every call of its kernel: one packing (and one
        # packed copy) where slices of the batch call a kernel on the same weight.
        mod = relax.transform.EliminateCommonSubexpr()(mod)
        mod, pack_stage = _lift_weights(mod)
        mod = relax.transform.DeadCodeElimination(["main"])(mod)
        # Read after the split: kernels with packed weights are renamed (*_prepacked).
        kernels = schedules.kernel_rules(mod)
        work = schedules.kernel_work(mod)
    log.info("%d kernels; %d scheduled by rules", len(kernels),
             sum(r != schedules.UNSCHEDULED for r in kernels.values()))
    return Optimized(mod, [graph_stage, pack_stage], kernels, work)


def compile_transform(stages: list, target) -> list:
    """The weight stages compiled for ``target`` (a CPU): what ``apply_transform`` runs
    and a build folder keeps (``weights_transform_<i>.so``) for refits."""
    import tvm

    return [tvm.compile(stage, target=target) for stage in stages]
