"""Fusing a producer kernel into the one kernel that consumes its result, after operator
fusion: the mechanism the graph passes that merge kernels share (``separable_fusion``:
a depthwise conv into the pointwise conv after it; ``activation_fusion``: an activation
into the depthwise conv that reads it).

A pair is two ``call_tir`` bindings of ``main``: the producer's result is the
consumer's first argument and has no other use. ``fuse_pairs`` groups each pair into a
primitive function called from ``main`` and lets Relax's ``FuseTIR`` merge the group
into one PrimFunc.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def call_tir_parts(value):
    """(PrimFunc GlobalVar, argument list) of a ``call_tir`` call, or None."""
    import tvm
    from tvm import relax

    if (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir"))
            and isinstance(value.args[0], tvm.ir.GlobalVar)
            and isinstance(value.args[1], relax.Tuple)):
        return value.args[0], list(value.args[1].fields)
    return None


def use_counts(func) -> dict:
    """Var -> how many times ``func``'s body reads it (a var passed twice to one
    ``call_tir`` counts twice; definitions do not count)."""
    from tvm import relax

    counts: dict = {}

    def add(var, n=1):
        counts[var] = counts.get(var, 0) + n

    for block in func.body.blocks:
        for binding in block.bindings:
            parts = call_tir_parts(binding.value)
            if parts is not None:
                for arg in parts[1]:
                    for var in relax.analysis.free_vars(arg):
                        add(var)
            else:  # (free_vars lists each var once: it counts once per binding here)
                for var in relax.analysis.free_vars(binding.value):
                    add(var)
    for var in relax.analysis.free_vars(func.body.body):
        add(var)
    return counts


# What ``find_pairs``'s classifier says of a kernel.
PRODUCER = "producer"
CONSUMER = "consumer"


def find_pairs(mod, role) -> list[tuple]:
    """(producer binding, consumer binding) pairs of ``mod``'s main: a kernel that
    ``role(prim_func)`` calls ``PRODUCER`` whose result is used only as the first
    argument of a kernel it calls ``CONSUMER`` (None: neither). Each kernel is asked
    once, however many calls share it."""
    from tvm import relax

    main = mod["main"]
    uses = use_counts(main)
    roles: dict = {}

    def role_of(gv):
        if gv not in roles:
            roles[gv] = role(mod[gv])
        return roles[gv]

    producers = {}
    pairs = []
    for block in main.body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                continue
            parts = call_tir_parts(binding.value)
            if parts is None:
                continue
            gv, args = parts
            kind = role_of(gv)
            if (kind == CONSUMER and args and args[0] in producers
                    and uses.get(args[0]) == 1):
                pairs.append((producers.pop(args[0]), binding))
            elif kind == PRODUCER:
                producers[binding.var] = binding
    return pairs


def kernels_of(pair) -> tuple:
    """The (producer kernel, consumer kernel) GlobalVars of a pair of bindings."""
    producer, consumer = pair
    return call_tir_parts(producer.value)[0], call_tir_parts(consumer.value)[0]


def _outer_args(producer, consumer) -> list:
    """The fused call's arguments: the producer kernel's, then the consumer kernel's
    other than the producer's result."""
    return call_tir_parts(producer.value)[1] + call_tir_parts(consumer.value)[1][1:]


def _group(producer, consumer):
    """The primitive function computing the pair from ``_outer_args``."""
    from tvm import relax

    first_gv, first_args = call_tir_parts(producer.value)
    second_gv, _ = call_tir_parts(consumer.value)
    outer = _outer_args(producer, consumer)
    params = [relax.Var(f"p{i}", a.ty) for i, a in enumerate(outer)]
    mid = relax.DataflowVar("produced", producer.var.ty)
    out = relax.DataflowVar("consumed", consumer.var.ty)
    n = len(first_args)
    bindings = [
        relax.VarBinding(mid, relax.call_tir(first_gv, params[:n], producer.var.ty)),
        relax.VarBinding(out, relax.call_tir(second_gv, [mid] + params[n:],
                                             consumer.var.ty)),
    ]
    body = relax.SeqExpr([relax.DataflowBlock(bindings)], out)
    func = relax.Function(params, body, consumer.var.ty, is_pure=True)
    return func.with_attr("Primitive", True)


def fuse_pairs(mod, pairs: list[tuple]):
    """``mod`` with each pair's two calls replaced by one call of a kernel that FuseTIR
    merges from the two PrimFuncs, and the map (producer kernel, consumer kernel) ->
    fused kernel's GlobalVar. Pairs of the same two kernels share one fused kernel."""
    import tvm
    from tvm import relax

    builder = relax.BlockBuilder(tvm.IRModule(dict(mod.functions_items())))
    drop, replace, groups = set(), {}, {}
    for producer, consumer in pairs:
        first_gv, second_gv = key = kernels_of((producer, consumer))
        if key not in groups:  # add_func gives the GlobalVar its function type
            groups[key] = builder.add_func(_group(producer, consumer),
                                           f"fused_{first_gv.name_hint}_{second_gv.name_hint}")
        drop.add(producer.var)
        replace[consumer.var] = relax.Call(groups[key], _outer_args(producer, consumer))
    out = builder.get()
    main = out["main"]
    blocks = []
    for block in main.body.blocks:
        bindings = [relax.VarBinding(b.var, replace[b.var]) if b.var in replace else b
                    for b in block.bindings if b.var not in drop]
        blocks.append(type(block)(bindings))
    out["main"] = relax.Function(main.params, relax.SeqExpr(blocks, main.body.body),
                                 main.ret_ty, main.is_pure, main.attrs)
    log.debug("fused %d kernel pairs", len(pairs))
    out = relax.transform.DeadCodeElimination()(relax.transform.FuseTIR()(out))
    # FuseTIR names each fused PrimFunc after its group.
    names = {key: out.get_global_var(gv.name_hint) for key, gv in groups.items()}
    return out, names
