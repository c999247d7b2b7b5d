"""Graph pass: fuse each depthwise conv kernel with the pointwise conv kernel that
consumes it into one kernel (a separable convolution), so that a schedule can produce
the depthwise output tile in cache and consume it at once, with no round trip through
main memory.

It runs after operator fusion (``FuseOps``/``FuseTIR``), on ``main``'s ``call_tir``
bindings: a depthwise kernel whose output is used only by a 1x1 stride-1 conv kernel
(with its fused epilogue) is grouped with it into a primitive function, and ``FuseTIR``
merges the group into one PrimFunc. Kernels are recognised by structure
(``schedules.analysis``), not by name.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _call_tir_parts(value):
    """(PrimFunc GlobalVar, argument list) of a ``call_tir`` call, or None."""
    import tvm
    from tvm import relax

    if (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir"))
            and isinstance(value.args[0], tvm.ir.GlobalVar)
            and isinstance(value.args[1], relax.Tuple)):
        return value.args[0], list(value.args[1].fields)
    return None


def _kind(func) -> str | None:
    """``DEPTHWISE``, or ``POINTWISE`` for a pointwise kernel a depthwise kernel can fuse
    into (stride 1, its input read once), else None (``schedules.analysis`` classifies)."""
    from tvm import s_tir

    from xcompile.schedules.analysis import DEPTHWISE, POINTWISE, match_conv2d_nhwc, pixel_for_pixel

    sch = s_tir.Schedule(func)
    conv = match_conv2d_nhwc(sch)
    if conv is None or conv.kind not in (DEPTHWISE, POINTWISE) or conv.tail:
        return None
    if conv.kind == DEPTHWISE:
        return DEPTHWISE
    # The input read once, by the conv (or its padding copy): a residual read of the
    # same tensor would need the depthwise output outside the fused pixel chunks.
    data = func.params[0]
    readers = [rv for rv in sch.get_child_blocks(sch.get_sblock("root"))
               if any(r.source.same_as(data) for r in sch.get(rv).reads)]
    return POINTWISE if pixel_for_pixel(sch, conv) and len(readers) == 1 else None


def _use_counts(func) -> dict:
    """Var -> how many times ``func``'s body reads it (a var passed twice to one
    ``call_tir`` counts twice; definitions do not count)."""
    from tvm import relax

    counts: dict = {}

    def add(var, n=1):
        counts[var] = counts.get(var, 0) + n

    def each_var(expr):
        seen = []
        relax.analysis.post_order_visit(
            expr, lambda e: seen.append(e) if isinstance(e, relax.Var) else None)
        return seen

    for block in func.body.blocks:
        for binding in block.bindings:
            parts = _call_tir_parts(binding.value)
            if parts is not None:
                for arg in parts[1]:
                    for var in each_var(arg):
                        add(var)
            else:  # visits are memoized: a var counts once per binding here
                for var in each_var(binding.value):
                    add(var)
    for var in each_var(func.body.body):
        add(var)
    return counts


def find_pairs(mod) -> list[tuple]:
    """(depthwise binding, pointwise binding) pairs of ``mod``'s main that can fuse."""
    from tvm import relax

    from xcompile.schedules.analysis import DEPTHWISE, POINTWISE

    main = mod["main"]
    uses = _use_counts(main)
    kinds: dict = {}

    def kind(gv):
        if gv not in kinds:
            kinds[gv] = _kind(mod[gv])
        return kinds[gv]

    producers = {}
    pairs = []
    for block in main.body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                continue
            parts = _call_tir_parts(binding.value)
            if parts is None:
                continue
            gv, args = parts
            if kind(gv) == DEPTHWISE:
                producers[binding.var] = binding
            elif kind(gv) == POINTWISE:
                # The depthwise result has no other use than this argument.
                sources = [a for a in args if a in producers and uses.get(a) == 1]
                if len(sources) == 1 and args[0].same_as(sources[0]):
                    dw = producers.pop(sources[0])
                    pairs.append((dw, binding))
    return pairs


def fuse_separable(accept=None):
    """The pass (see the module docstring); a no-op on a module with no such pairs.

    ``accept(prim_func) -> bool``, when given, vets each fused kernel (the pipeline asks
    the family's separable rule whether it can schedule it); a pair whose kernel it
    rejects stays two kernels."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="xcompile.FuseSeparable")
    def _pass(mod, _ctx):
        pairs = find_pairs(mod)
        while pairs:
            fused, kernels = _FuseRewriter(mod, pairs).run()
            rejected = {key for key, gv in kernels.items()
                        if accept is not None and not accept(fused[gv])}
            if not rejected:
                return fused
            log.debug("separable pairs left unfused (no schedule): %s", sorted(
                f"{dw.name_hint}+{pw.name_hint}" for dw, pw in rejected))
            pairs = [p for p in pairs if _key(*p) not in rejected]
        return mod

    return _pass


def _key(dw, pw) -> tuple:
    """The (depthwise kernel, pointwise kernel) GlobalVars of a pair of bindings."""
    return _call_tir_parts(dw.value)[0], _call_tir_parts(pw.value)[0]


class _FuseRewriter:
    """Groups each pair into a primitive function, calls it from main, runs FuseTIR;
    ``run`` returns the module and (depthwise, pointwise) kernel -> fused kernel."""

    def __init__(self, mod, pairs):
        self.mod = mod
        self.pairs = pairs

    @staticmethod
    def _outer_args(dw, pw) -> list:
        """The fused call's arguments: the depthwise kernel's, then the pointwise
        kernel's other than the depthwise output."""
        return _call_tir_parts(dw.value)[1] + _call_tir_parts(pw.value)[1][1:]

    def _group(self, dw, pw):
        """The primitive function computing the pair from ``_outer_args``."""
        from tvm import relax

        dw_gv, dw_args = _call_tir_parts(dw.value)
        pw_gv, _ = _call_tir_parts(pw.value)
        outer = self._outer_args(dw, pw)
        params = [relax.Var(f"p{i}", a.ty) for i, a in enumerate(outer)]
        mid = relax.DataflowVar("depthwise", dw.var.ty)
        out = relax.DataflowVar("separable", pw.var.ty)
        n = len(dw_args)
        bindings = [
            relax.VarBinding(mid, relax.call_tir(dw_gv, params[:n], dw.var.ty)),
            relax.VarBinding(out, relax.call_tir(pw_gv, [mid] + params[n:],
                                                 pw.var.ty)),
        ]
        body = relax.SeqExpr([relax.DataflowBlock(bindings)], out)
        func = relax.Function(params, body, pw.var.ty, is_pure=True)
        return func.with_attr("Primitive", True)

    def run(self):
        import tvm
        from tvm import relax

        builder = relax.BlockBuilder(tvm.IRModule(dict(self.mod.functions_items())))
        drop, replace, groups = set(), {}, {}
        for dw, pw in self.pairs:
            dw_gv, pw_gv = key = _key(dw, pw)  # repeated blocks share kernels and groups
            if key not in groups:  # add_func gives the GlobalVar its function type
                groups[key] = builder.add_func(self._group(dw, pw),
                                               f"fused_{dw_gv.name_hint}_{pw_gv.name_hint}")
            drop.add(dw.var)
            replace[pw.var] = relax.Call(groups[key], self._outer_args(dw, pw))
        mod = builder.get()
        main = mod["main"]
        blocks = []
        for block in main.body.blocks:
            bindings = [relax.VarBinding(b.var, replace[b.var]) if b.var in replace else b
                        for b in block.bindings if b.var not in drop]
            blocks.append(type(block)(bindings))
        mod["main"] = relax.Function(main.params, relax.SeqExpr(blocks, main.body.body),
                                     main.ret_ty, main.is_pure, main.attrs)
        log.debug("fused %d depthwise -> pointwise pairs", len(self.pairs))
        mod = relax.transform.DeadCodeElimination()(relax.transform.FuseTIR()(mod))
        # FuseTIR names each fused PrimFunc after its group.
        names = {key: mod.get_global_var(gv.name_hint) for key, gv in groups.items()}
        return mod, names
