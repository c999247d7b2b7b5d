"""Graph pass: the layers whose feature maps are too large for the caches at the model's
batch run on slices of the batch, one after another, and the rest at the whole batch.

At batch 8, Xception's entry flow holds 88 MB feature maps (147x147x128): every layer
there reads its input from memory and writes its output to lines that are not in any
cache (the write first reads them), where at batch 1 the same layers find their 11 MB
maps in the last-level cache. The model at batch 8 ran 1.02x as long as eight runs at
batch 1 (355 against 8 x 43.4 ms on the 2-core Emerald Rapids). The middle flow's 19x19x728
maps are 8.4 MB at batch 8: more than the cores' L2 caches, so each depthwise conv there
read its input from the L3 and its kernels summed 27.1 ms a run against 15.9 for eight
runs at batch 1 (2-core Zen 4, 1 MiB of L2 a core); the GEMMs beside them timed alike
at either batch.

``main`` is cut where one activation alone carries everything later layers read (a
dominator of the graph's output), at the first such place after the last map larger
than ``max_bytes`` at the whole batch, or a later one that carries less (the global
pool's output rather than the map before it). The bindings before the cut are emitted
once per slice of the batch, on ``strided_slice`` of the input (the weights and what is
computed from them alone are shared), and the slices' cut values are concatenated along
the batch. The slice is the largest divisor of the batch whose maps stay within
``max_bytes``, else one image (at most ``MAX_SLICES`` slices). Every re-emitted operator
must infer the sliced shape (the original's with the batch replaced); where one does not
(a reshape that spells the batch out), the module is left as it was.

With the x86 presets' 24 MiB, legacy_xception at batch 8 ran the layers up to block 3's
output on 4 slices of 2 images: on the Emerald Rapids 0.978x and 0.979x as long untuned,
peak resident memory (``bench --memory``) 410 -> 323 MiB; slices of 1 or 4 images there
measured the same within the host's noise. With 2 MiB (the L2 of two cores of the
smallest, 1 MiB) every layer up to the global pool runs on 8 slices of one image: on the
Zen 4, interleaved in one process against the 24 MiB build (the median ratio of each
round's pair): 0.962x untuned against untuned; with the shipped log (whose batch-1
results then apply) 0.968x-1.020x over nine runs, median 0.993x, within the host's
noise. MobileNetV2 0.815x, EfficientNet-B0 0.882x, ConvNeXt-atto 0.959x. Peak resident
memory at batch 8 322.1 -> 220.4 MiB (Python loader), 243.4 -> 141.7 (C++ runner).
"""

from __future__ import annotations

import logging

from xcompile.frontend import static_shape, tensor_bytes

log = logging.getLogger(__name__)

# The most slices ``main`` is unrolled into: each repeats the prefix's bindings (at batch
# 8 in slices of one image legacy_xception's build took 10-27 s against 9-10 unsliced).
MAX_SLICES = 8


def tile_batch(max_bytes: int):
    """The pass (see the module docstring); a no-op when ``max_bytes`` is 0, at batch 1,
    or when no cut or slice qualifies."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="xcompile.TileBatch")
    def _pass(mod, _ctx):
        if not max_bytes or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        func = mod["main"]
        if not isinstance(func, relax.Function):
            return mod
        tiled = _tile(func, max_bytes)
        if tiled is None:
            return mod
        mod = tvm.IRModule(dict(mod.functions_items()))
        mod["main"] = tiled
        return mod

    return _pass


def _plan(func, max_bytes: int):
    """(the bindings of ``main``'s dataflow block, the set of activation variables, the
    indices of the bindings to cut after, preferred first, the slice size, the batch), or
    None."""
    from tvm import relax

    body = func.body
    if (not isinstance(body, relax.SeqExpr) or len(body.blocks) != 1
            or not isinstance(body.blocks[0], relax.DataflowBlock) or not func.params):
        return None
    bindings = list(body.blocks[0].bindings)
    if any(not isinstance(b, relax.VarBinding) for b in bindings):
        return None
    x = func.params[0]
    shape = static_shape(x.ty)
    if shape is None or len(shape) < 2 or shape[0] < 2:
        return None
    batch = shape[0]
    # Which bindings depend on the input (activations), and where each is last read.
    activation = {x}
    last_use: dict = {}
    for i, b in enumerate(bindings):
        used = relax.analysis.free_vars(b.value)
        for v in used:
            last_use[v] = i
        if any(v in activation for v in used):
            activation.add(b.var)
    for v in relax.analysis.free_vars(body.body):
        last_use[v] = len(bindings)
    large = [i for i, b in enumerate(bindings) if b.var in activation
             and tensor_bytes(b.var.ty) > max_bytes]
    if not large:
        return None
    # The places to cut after the last large map: one activation carries the rest, it is
    # not the output, and no output of the block comes before it (it would be sliced).
    live: set = set()
    cuts = []
    for i, b in enumerate(bindings[:-1]):
        live = {v for v in live if last_use.get(v, -1) > i}
        if b.var in activation and last_use.get(b.var, -1) > i:
            live.add(b.var)
        if not isinstance(b.var, relax.DataflowVar):
            break
        if i >= large[-1] and live == {b.var}:
            cuts.append(i)
    if not cuts:
        return None
    biggest = max(tensor_bytes(b.var.ty) for b in bindings[:cuts[0] + 1]
                  if b.var in activation)
    m = slice_size(biggest // batch, batch, max_bytes)
    if m == batch:
        return None
    # The first place, or a later one where less is carried: each slice's part waits for
    # the concatenation in storage the memory planner may give it from a map up to 16x
    # its size (Xception's 10x10x2048 parts each held an 11 MB token, 9 tokens in all
    # against 2 at batch 1; after the global mean, 8 KB parts).
    first = tensor_bytes(bindings[cuts[0]].var.ty)
    later = sorted((i for i in cuts[1:] if tensor_bytes(bindings[i].var.ty) < first),
                   key=lambda i: (tensor_bytes(bindings[i].var.ty), i))
    return bindings, activation, later + cuts[:1], m, batch


def slice_size(per_image: int, batch: int, max_bytes: int) -> int:
    """Images per slice: the largest divisor of ``batch`` (below it) whose maps of
    ``per_image`` bytes an image stay within ``max_bytes``; where none does, the
    smallest divisor that keeps the slices to ``MAX_SLICES``."""
    sizes = [m for m in range(batch - 1, 0, -1)
             if batch % m == 0 and batch // m <= MAX_SLICES]
    if not sizes:
        return batch
    fits = [m for m in sizes if per_image * m <= max_bytes]
    return fits[0] if fits else sizes[-1]


def _substitute(expr, env: dict):
    """``expr`` with the variables in ``env`` replaced (calls, tuples, tuple items)."""
    from tvm import relax

    if isinstance(expr, relax.Var):
        return env.get(expr, expr)
    if isinstance(expr, relax.Call):
        return relax.Call(expr.op, [_substitute(a, env) for a in expr.args], expr.attrs,
                          expr.ty_args)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([_substitute(f, env) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(_substitute(expr.tuple_value, env), expr.index)
    if isinstance(expr, relax.ShapeExpr):
        # A new node: the block builder's normalizer annotates the shapes it meets in
        # place, and this one still belongs to the original function.
        return relax.ShapeExpr(list(expr.values))
    if not relax.analysis.free_vars(expr):  # a constant, a value: nothing to replace
        return expr
    raise _Declined(f"{type(expr).__name__} binding")


class _Declined(Exception):
    """The graph cannot be sliced (an operator does not follow the batch)."""


def _follows_the_batch_to(bindings, activation, end: int, x, m: int, batch: int) -> int:
    """The index of the first activation up to binding ``end`` that, computed on a slice
    of ``m`` images, does not have the original's shape with the batch replaced, or
    ``end + 1`` where all do (checked by type inference alone, on stand-in variables,
    before anything is emitted): a cut before that index may be sliced."""
    from tvm import relax

    scratch = relax.BlockBuilder()
    shape = static_shape(x.ty)
    env = {x: relax.Var("slice", relax.TensorType([m] + shape[1:], x.ty.dtype))}
    for i, b in enumerate(bindings[:end + 1]):
        if b.var not in activation:
            continue
        want = static_shape(b.var.ty)
        try:
            got = static_shape(scratch.normalize(_substitute(b.value, env)).ty)
        except (_Declined, ValueError, TypeError, RuntimeError) as e:  # TVM's errors too
            log.debug("batch tiling declined at %s: %s", b.var, e)
            return i
        if want is None or want[0] != batch or got != [m] + want[1:]:
            log.debug("batch tiling declined at %s: %s for a slice of %s", b.var, got, want)
            return i
        env[b.var] = relax.Var("sliced", relax.TensorType(got, b.var.ty.dtype))
    return end + 1


def _tile(func, max_bytes: int):
    """``func`` with its large-map layers on slices of the batch, or None."""
    from tvm import relax

    plan = _plan(func, max_bytes)
    if plan is None:
        return None
    bindings, activation, cuts, m, batch = plan
    x = func.params[0]
    # One check up to the farthest place serves every place before it.
    reach = _follows_the_batch_to(bindings, activation, max(cuts), x, m, batch)
    cut = next((c for c in cuts if c < reach), None)
    if cut is None:
        return None
    bb = relax.BlockBuilder()
    attrs = dict(func.attrs.items()) if func.attrs is not None else None
    with bb.function("main", list(func.params), attrs=attrs, pure=func.is_pure):
        with bb.dataflow():
            env: dict = {}
            # What the prefix computes from weights alone, once, for every slice.
            for b in bindings[:cut + 1]:
                if b.var not in activation:
                    env[b.var] = bb.emit(_substitute(b.value, env))
            parts = []
            for s in range(batch // m):
                local = dict(env)
                local[x] = bb.emit(relax.op.strided_slice(x, axes=[0], begin=[s * m],
                                                          end=[(s + 1) * m]))
                for b in bindings[:cut + 1]:
                    if b.var in activation:
                        local[b.var] = bb.emit(_substitute(b.value, local))
                parts.append(local[bindings[cut].var])
            env[bindings[cut].var] = bb.emit(relax.op.concat(parts, axis=0))
            for b in bindings[cut + 1:]:
                value = _substitute(b.value, env)
                if isinstance(b.var, relax.DataflowVar):
                    env[b.var] = bb.emit(value)
                else:
                    env[b.var] = bb.emit_output(value)
        bb.emit_func_output(_substitute(func.body.body, env))
    log.info("batch %d: the layers up to the %s map %s run on %d slices of %d image%s",
             batch, "x".join(map(str, static_shape(bindings[cut].var.ty))), bindings[cut].var,
             batch // m, m, "s" if m > 1 else "")
    return bb.get()["main"]
