"""CPU schedule rules against the unscheduled TIR of the same kernel, over Xception's
shapes and odd ones, for every CPU preset this machine executes (the others are
skipped, saying why); structure of what they produce; rules decline what they do not
fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernels import (CONV_CASES, CPU_PRESETS, DEPTHWISE_CASES, HOST, SEPARABLE_CASES,
                     assert_computes_the_same, conv_kernel, depthwise_kernel,
                     executable_cpu_presets, finished, lowered_kernels, random_args,
                     run_kernel, separable_kernel)
from torch import nn

from xcompile import targets
from xcompile.schedules.cpu import (Fallback, PackedConvGEMM, SeparableConv, VectorDepthwise,
                                    VectorMatmul)


@pytest.fixture(params=executable_cpu_presets())
def preset(request):
    """A CPU preset whose code this machine runs."""
    return targets.resolve(request.param)


def check_rule(rule, func, preset, expect_parallel=True, vectorized=True):
    """Apply ``rule`` for ``preset``; its kernel, built for that preset, must compute
    what the unscheduled one does."""
    target = preset.tvm_target()
    sch = rule.apply(func, target)
    assert sch is not None, f"{rule.name} declined"
    script = sch.mod["main"].script()
    if vectorized:
        assert "T.vectorized" in script
    if expect_parallel:
        assert "T.parallel" in script
    assert_computes_the_same(func, sch.mod["main"], target)
    return sch


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_gemm_matches_unscheduled(case, preset):
    func = conv_kernel(**case)
    sch = check_rule(PackedConvGEMM(), func, preset)
    assert "layout_rewrite_preproc" in sch.mod["main"].script()  # weights packed


@pytest.mark.parametrize("case", DEPTHWISE_CASES)
def test_depthwise_matches_unscheduled(case, preset):
    func = depthwise_kernel(**case)
    assert PackedConvGEMM().apply(func, preset.tvm_target()) is None
    check_rule(VectorDepthwise(), func, preset)


@pytest.mark.parametrize("case", SEPARABLE_CASES)
def test_separable_matches_unscheduled(case, preset):
    """One kernel computes both convs: the depthwise rows of each pixel chunk, then its
    GEMM tiles, with no full-size depthwise output."""
    func = separable_kernel(**case)
    for single in (PackedConvGEMM(), VectorDepthwise()):
        assert single.apply(func, preset.tvm_target()) is None
    sch = check_rule(SeparableConv(), func, preset)
    script = sch.mod["main"].script()
    chunk = script.index("T.parallel")
    # The depthwise block sits inside the parallel chunk loop, before the GEMM.
    assert script.index('T.sblock("group_conv2d_nhwc') > chunk
    assert script.index('T.sblock("group_conv2d_nhwc') < script.index('T.sblock("conv2d_nhwc')


@pytest.mark.parametrize("channels,lanes", [(12, 4), (728, 8), (40, 8), (13, 1)])
def test_depthwise_takes_any_channel_count(channels, lanes, preset):
    """Channels that do not fill whole vectors of the target get the widest whole
    vectors that divide them, or, where those are under half the target's width or
    few would be computed twice, and the channels fill one vector, full-width vectors,
    the last overlapping the one before (13 channels: scalar code on AVX-512, 8 lanes
    on AVX2, 4 on NEON; 728: 16 lanes on AVX-512); never the generic rule."""
    from xcompile.schedules.cpu.target_info import channel_vector, cpu_info

    full = cpu_info(preset.tvm_target()).lanes
    func = conv_kernel(channels, channels, size=9, k=3, pad=1, groups=channels)
    whole = channel_vector(channels, full)
    assert whole == min(lanes, full)
    # Full-width vectors where whole ones are under half the width, or the overlap is
    # at most an eighth of the channels (728: 8 of them on AVX-512).
    overlapped = channels > full and (whole < full // 2 or channels == 728 and whole < full)
    width = full if overlapped else whole
    default = VectorDepthwise().all_configs(func, preset.tvm_target())[0]
    assert default.overlapped == overlapped
    sch = check_rule(VectorDepthwise(), func, preset, vectorized=width > 1)
    if width > 1:
        assert f"T.vectorized(T.int64({width}))" in sch.mod["main"].script()


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_depthwise_overlaps_vectors_where_whole_ones_are_narrow(name):
    """The default (every preset's width from its target): 61 channels (odd: whole
    vectors are scalar) in full-width vectors, the last overlapping; 728 too where the
    width does not divide them (AVX-512: 46 of 16, 8 channels computed twice, instead of
    91 of 8); 40 in whole vectors (AVX-512: 48 channels' work for 40), the overlapped
    ones left to the tuner wherever they fit."""
    from xcompile.schedules.cpu.target_info import cpu_info

    target = targets.resolve(name).tvm_target()
    lanes = cpu_info(target).lanes
    rule = VectorDepthwise()
    odd = rule.all_configs(depthwise_kernel(c=61, size=9, k=3, pad=1), target)
    assert odd[0].overlapped and {c.overlapped for c in odd} == {True, False}
    for c, default in ((728, 728 % lanes != 0), (40, False)):
        configs = rule.all_configs(depthwise_kernel(c=c, size=9, k=3, pad=1), target)
        assert configs[0].overlapped == default, (name, c)
        assert any(config.overlapped for config in configs) == (c % lanes != 0), (name, c)


def test_depthwise_overlapped_tiles_compute_the_channels_once_each(preset):
    """Every overlapped configuration of 61 channels (1, 2 or 4 full-width vectors a
    tile, both loop orders, a row tile of pixels) computes what the unscheduled kernel
    does at batch 2; the finished kernel keeps no channel predicate (it vectorizes
    whole) and moves the last tile back by a ``min``; a second run of the pass changes
    nothing. So does a depthwise conv with a channel multiplier (39 = 13 x 3 channels).
    (Two vectors a tile once moved the second onto the first and added the overlap into
    the same accumulators twice.)"""

    from xcompile.schedules.cpu.target_info import cpu_info

    target = preset.tvm_target()
    lanes = cpu_info(target).lanes
    func = depthwise_kernel(c=61, size=9, k=3, pad=1, batch=2)
    configs = [c for c in VectorDepthwise().all_configs(func, target) if c.overlapped]
    # Tiles that divide the vectors and fit the channels: 4 of 16 lanes, 8 of 8, 16 of 4.
    assert {c.vectors for c in configs} == {16: {1, 2}, 8: {1, 2, 4}, 4: {1, 2, 4}}[lanes]
    for config in configs:
        sch = VectorDepthwise().apply_config(func, target, config)
        assert_computes_the_same(func, sch.mod["main"], target)
        done = finished(sch.mod["main"])
        script = done.script()
        wheres = [ln for ln in script.splitlines() if "T.where" in ln]
        assert not [ln for ln in wheres if "ff_" in ln], (config, wheres)  # (pixels': kept)
        assert "T.min(" in script and f"T.int64({61 - config.vectors * lanes})" in script
        assert f"T.vectorized(T.int64({lanes}))" in script
        assert finished(done).same_as(done)
    # A channel multiplier: 13 input channels x 3, each output channel reading input
    # channel c // 3 through the moved binding.
    func = depthwise_kernel(c=13, mult=3, size=7, k=3, pad=1)
    config = VectorDepthwise().all_configs(func, target)[0]
    assert config.overlapped
    sch = VectorDepthwise().apply_config(func, target, config)
    assert_computes_the_same(func, sch.mod["main"], target)


def test_overlap_pass_leaves_a_tile_wider_than_the_channels(preset):
    """A tile of two 16-lane vectors over 20 channels cannot move back inside them: the
    pass leaves every block's predicate (scalar code, the right result) and drops its
    mark."""
    import tvm
    from tvm import s_tir

    from xcompile.schedules.analysis import match_conv
    from xcompile.schedules.cpu.depthwise import DepthwiseTile

    target = preset.tvm_target()
    func = depthwise_kernel(c=20, size=7, k=3, pad=1)
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    conv = match_conv(sch, target, "llvm", ("depthwise",), tail=True)
    VectorDepthwise._schedule(sch, conv, 16, DepthwiseTile(vectors=2))
    assert "xcompile.overlap_channels" in sch.mod["main"].script()
    script = finished(sch.mod["main"]).script()
    assert "xcompile.overlap_channels" not in script and "T.min(" not in script
    assert script.count("T.where") == sch.mod["main"].script().count("T.where") > 0
    assert_computes_the_same(func, sch.mod["main"], target)


class _Head(nn.Module):
    """Max pool with a residual add, global average pool, FC: the rest of Xception."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(64, 64, 1)  # as in Xception, pools read NHWC conv outputs
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.skip = nn.Conv2d(64, 64, 1, 2, bias=False)
        self.fc = nn.Linear(64, 1000)

    def forward(self, x):
        x = self.pre(x)
        y = torch.relu(self.pool(x) + self.skip(x))
        return self.fc(y.mean((2, 3)))


def test_depthwise_tiles_follow_the_epilogue(preset):
    """The default tile is one pixel under a light epilogue (bias, ReLU) and a row of
    pixels split evenly under a heavy one (SiLU: 19 pixels as 10 + 9 with 32 registers,
    7 + 7 + 5 with 16); every tile the tuner may pick computes what the unscheduled
    kernel does, the uneven ones included."""
    from xcompile.schedules.cpu.depthwise import row_tile
    from xcompile.schedules.cpu.target_info import cpu_info

    target = preset.tvm_target()
    registers = cpu_info(target).registers
    light = VectorDepthwise().all_configs(depthwise_kernel(c=32, size=19, k=3, pad=1), target)
    assert (light[0].vectors, light[0].pixels, light[0].channels_outer) == (1, 1, True)
    func = depthwise_kernel(c=32, size=19, k=3, pad=1, act=nn.SiLU)
    configs = VectorDepthwise().all_configs(func, target)
    assert configs[0].pixels == row_tile(19, registers) == (10 if registers == 32 else 7)
    assert configs[0].channels_outer
    assert all(c.vectors * c.pixels <= registers // 2 for c in configs)
    # Every tile in both loop orders, for the tuner to time.
    assert ({(c.vectors, c.pixels) for c in configs if c.channels_outer}
            == {(c.vectors, c.pixels) for c in configs if not c.channels_outer})
    for config in [c for c in configs if 19 % c.pixels]:
        sch = VectorDepthwise().apply_config(func, target, config)
        assert_computes_the_same(func, sch.mod["main"], target)


def test_depthwise_runs_each_channel_vector_along_the_row(preset):
    """The default order where the window's rows fit L1: a row's channel vectors outside
    its pixels (each vector's window of weights held across the row), padded borders
    included; the other order keeps the key tuning logs timed it under (the field is
    left out at its default)."""
    from xcompile.schedules.cpu.depthwise import DepthwiseTile

    target = preset.tvm_target()
    rule = VectorDepthwise()
    func = depthwise_kernel(c=64, size=21, k=3, pad=1)
    for outer in (True, False):
        config = DepthwiseTile(1, 1, channels_outer=outer)
        sch = rule.apply_config(func, target, config)
        assert_computes_the_same(func, sch.mod["main"], target)
        loops = [str(sch.get(rv).loop_var) for rv in sch.get_loops(
            sch.get_sblock("group_conv2d_nhwc_update"))]
        channel, pixel = loops.index("ff_0"), loops.index("xx_0")
        assert (channel < pixel) == outer, loops
    assert rule.config_to_json(DepthwiseTile(1, 1)) == {"vectors": 1, "pixels": 1}
    assert rule.config_to_json(DepthwiseTile(1, 1, True))["channels_outer"] is True
    assert rule.default_config_key(func, target) != '{"pixels": 1, "vectors": 1}'


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_depthwise_order_follows_what_l1_holds(name):
    """Channels inside a pixel by default only where a channel vector's pass along the
    row misses L1 and a pixel's window over all channels fits it (``channels_outside``).
    On every preset's L1 (x86: 64 sets x 8 ways, ARM: 128 x 4, 64-byte lines): 128
    channels on 149-pixel input rows (lines 512 bytes apart fill every 8th set: 447
    lines for 64 places) go inside; 728 channels (2912 bytes apart: every set, 63 lines)
    and 1024 on 12-pixel rows (the window's inputs and weights: 2 x 36 KB) stay
    outside."""
    from xcompile.schedules.cpu.target_info import cpu_info

    target = targets.resolve(name).tvm_target()
    info = cpu_info(target)
    assert info.l1_sets * info.l1_ways * 64 == 32 << 10, info  # the geometry above
    rule = VectorDepthwise()
    for c, size, outer in ((128, 147, False), (728, 19, True), (1024, 10, True)):
        default = rule.all_configs(depthwise_kernel(c=c, size=size, k=3, pad=1), target)[0]
        assert default.channels_outer == outer, (name, c, size)


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_gemm_chunks_keep_their_rows_in_l2(name):
    """A parallel chunk's input rows take at most L2_SHARE of the preset's L2 where a
    chunk size that pads as little (within CHUNK_NEAR_TIE) allows it (``chunk_tiles``).
    Xception's 19x19 728 -> 728 GEMM on 2 cores: at batch 8 (2,888 rows) the chunks are smaller than
    without the L2 and within it where 8 tiles fit (AVX-512: 14-row tiles of 40.8 KB in
    1 MiB); at batch 1 (361 rows) they pad no more rows than without it (AVX-512: 2
    chunks of 13 tiles, 364 rows)."""
    from xcompile.schedules.cpu.conv_gemm import (CHUNK_NEAR_TIE, L2_SHARE,
                                                  MIN_TILES_PER_CHUNK, gemm_configs)
    from xcompile.schedules.cpu.target_info import cpu_info

    info = cpu_info(targets.resolve(name).tvm_target())
    budget = info.l2_bytes * L2_SHARE

    def default(rows, l2_bytes):
        return gemm_configs(rows, 728, info.lanes, info.registers, 2, 728, direct=True,
                            l2_bytes=l2_bytes)[0]

    def padded(config, rows):
        chunk = config.mr * config.mb
        return -(-rows // chunk) * chunk

    for rows in (8 * 361, 361):
        chosen, plain = default(rows, info.l2_bytes), default(rows, 0)
        tile_bytes = chosen.mr * 728 * 4
        assert not chosen.tile_major and (chosen.mr, chosen.nu) == (plain.mr, plain.nu)
        assert padded(chosen, rows) <= padded(plain, rows) * (1 + CHUNK_NEAR_TIE), (
            name, rows, chosen, plain)
        if rows > 361:
            assert chosen.mb < plain.mb, (name, chosen, plain)
            if MIN_TILES_PER_CHUNK * tile_bytes <= budget:
                assert chosen.mb * tile_bytes <= budget, (name, chosen)


def test_generic_rule_on_everything_else(preset):
    target = preset.tvm_target()
    kernels = lowered_kernels(_Head(), (1, 64, 38, 38))
    others = {n: f for n, f in kernels.items() if "conv2d" not in n}
    assert any("max_pool" in n for n in others) and any("matmul" in n for n in others)
    for name, func in others.items():
        assert PackedConvGEMM().apply(func, target) is None, name
        assert VectorDepthwise().apply(func, target) is None, name
        sch = Fallback().apply(func, target)
        args = random_args(func)
        want = run_kernel(func, [a.copy() for a in args], target)
        got = run_kernel(sch.mod["main"], [a.copy() for a in args], target)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    pool = next(f for n, f in others.items() if "max_pool" in n)
    script = Fallback().apply(pool, target).mod["main"].script()
    assert "T.parallel" in script and "T.vectorized" in script


class _Pools(nn.Module):
    """A max pool with a residual add (Xception's entry flow), an average pool with a
    ReLU after it, and a mean: over ``channels`` channels (13: no whole vector)."""

    def __init__(self, channels):
        super().__init__()
        self.pre = nn.Conv2d(channels, channels, 1)
        self.skip = nn.Conv2d(channels, channels, 1, 2, bias=False)
        self.max = nn.MaxPool2d(3, 2, 1)
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        x = self.pre(x)
        y = self.max(x) + self.skip(x)
        return torch.relu(self.avg(y)).mean((2, 3))


@pytest.mark.parametrize("channels", [64, 13, 37])
def test_reduction_rule_on_pools_and_means(channels, preset):
    """Pools and means get one parallel loop nest, a channel vector's accumulator held
    over the window and the epilogue (the residual add, the ReLU, the division) in its
    write-back, and compute what the unscheduled kernels do; convolutions and the
    matrix product are not theirs. 37 channels (odd, over every preset's width): the
    pools run full-width vectors, the last moved back (no channel predicate left)."""

    from xcompile.schedules.cpu import VectorReduction
    from xcompile.schedules.cpu.target_info import cpu_info

    target = preset.tvm_target()
    lanes = cpu_info(target).lanes
    kernels = lowered_kernels(_Pools(channels), (2, channels, 19, 19))
    reductions = {n: f for n, f in kernels.items()
                  if any(k in n for k in ("pool", "mean", "sum"))}
    assert len(reductions) >= 3, sorted(kernels)
    for name, func in reductions.items():
        sch = check_rule(VectorReduction(), func, preset, vectorized=channels % 4 == 0
                         or (channels == 37 and "pool" in name))
        script = sch.mod["main"].script()
        assert script.count("T.parallel") == 1, name  # no second pass for the epilogue
        if channels == 37 and "pool" in name:
            text = finished(sch.mod["main"]).script()
            assert f"T.vectorized(T.int64({lanes}))" in text and "T.min(" in text, name
            assert not [ln for ln in text.splitlines()
                        if "T.where" in ln and "_0 *" in ln], name
    for name, func in lowered_kernels(_Head(), (1, 64, 38, 38)).items():
        if "conv2d" in name or "matmul" in name:
            assert VectorReduction().apply(func, target) is None, name


class _Classifier(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.fc = nn.Linear(k, n)

    def forward(self, x):
        return torch.relu(self.fc(x.mean((2, 3))))


@pytest.mark.parametrize("batch,k,n", [(1, 2048, 1000), (1, 1280, 1000), (8, 64, 40),
                                       (2, 33, 7), (3, 16, 48)])
def test_matmul_matches_unscheduled(batch, k, n, preset):
    """The classifier's matrix product (bias and ReLU in its write-back): Xception's and
    EfficientNet's at batch 1, a batch of 8, an odd column count (scalar code), a batch
    that no row tile divides."""
    kernels = lowered_kernels(_Classifier(k, n), (batch, k, 4, 4))
    func = next(f for name, f in kernels.items() if "matmul" in name)
    sch = check_rule(VectorMatmul(), func, preset, vectorized=n % 2 == 0)
    # B is packed into per-tile panels by a block the build lifts out of the kernel.
    assert "meta_schedule.layout_rewrite_preproc" in sch.mod["main"].script()


def test_matmul_rule_declines_everything_else(preset):
    target = preset.tvm_target()
    kernels = lowered_kernels(_Head(), (1, 64, 38, 38))
    for name, func in kernels.items():
        taken = VectorMatmul().apply(func, target) is not None
        assert taken == ("matmul" in name), name


def test_rules_decline_gpu_targets():
    func = conv_kernel(64, 128, size=19)
    cuda = targets.resolve("cuda").tvm_target()
    for rule in (PackedConvGEMM(), VectorDepthwise(), Fallback()):
        assert rule.apply(func, cuda) is None


def _asm(func, preset_name, rule=None):
    """The assembly of ``func`` scheduled by ``rule`` (default PackedConvGEMM) for a preset."""
    import tvm

    preset = targets.resolve(preset_name)
    sch = (rule or PackedConvGEMM()).apply(func, preset.tvm_target())
    main = finished(sch.mod["main"].with_attr("global_symbol", "main"))
    lib = tvm.compile(tvm.IRModule({"main": main}), target=preset.tvm_target())

    def find(m):
        if m.kind == "llvm":
            return m.inspect_source("asm")
        return next((s for s in map(find, m.imports) if s), None)

    return find(lib.mod)


def test_avx512_instructions():
    asm = _asm(conv_kernel(64, 128, size=19), "x86-avx512")
    assert "vfmadd231ps\t%zmm" in asm or "vfmadd231ps\t(" in asm and "zmm" in asm
    assert asm.count("zmm") > 20


def test_avx2_instructions():
    asm = _asm(conv_kernel(64, 128, size=19), "x86-avx2")
    assert "vfmadd231ps" in asm and "%ymm" in asm and "zmm" not in asm


def test_neon_instructions():
    asm = _asm(conv_kernel(64, 128, size=19), "arm64-neon")
    assert asm.count("fmla\tv") > 10 and ".4s" in asm


def test_register_tile_fits_the_registers():
    from xcompile.schedules.cpu.conv_gemm import register_tile

    for lanes, regs in ((8, 16), (16, 32), (4, 32)):
        for channels in (24, 32, 64, 728, 1000, 1024, 2048):
            mr, nu = register_tile(channels, lanes, regs)
            assert mr * nu + nu + 1 <= regs
            assert mr * nu >= 10  # enough independent FMAs to hide latency
    assert register_tile(728, 8, 16) == (6, 2)  # 728 -> 736 channels, 6x16 tile


def test_tiles_follow_the_pixel_rows_and_the_depth():
    """The register tile pads the pixel rows least (Xception's 19x19 maps: 14 rows, 361
    -> 364), the reduction runs as interleaved streams where the input channels split
    into runs of 16 or more, and the tuner's neighbourhood holds the other stream
    counts."""
    from xcompile.schedules.cpu.conv_gemm import depth_streams, gemm_configs, register_tile

    assert register_tile(728, 16, 32, rows=361) == (14, 2)
    assert register_tile(128, 16, 32, rows=96) == (12, 2)  # 96 rows: whole 12-row tiles
    # Tiles within 1% of the best score: the most accumulators, not the least padding
    # (5 x 2 on AVX2 pads 361 rows by 4, 6 x 2 by 5; 5 x 4 pads 21,609 by 1, 14 x 2 by 7).
    assert register_tile(728, 8, 16, rows=361) == (6, 2)
    assert register_tile(64, 16, 32, rows=21609) == (14, 2)
    assert [depth_streams(c) for c in (728, 64, 32, 24, 13, 3)] == [4, 4, 2, 1, 1, 1]
    configs = gemm_configs(361, 728, 16, 32, 2, 728)
    assert (configs[0].mr, configs[0].nu, configs[0].streams) == (14, 2, 4)
    assert {c.streams for c in configs} == {1, 2, 4, 8}
    assert all(c.streams == 1 for c in gemm_configs(361, 728, 16, 32, 2, 13))


def test_tiles_prefetch_the_next_weight_panel():
    """A pointwise GEMM's tiles split their reduction into parts of at least 24 steps
    per stream, and each part prefetches its share of the next weight panel into L2:
    Xception's 19x19x728 GEMM (4 streams of 182 steps) in 7 parts; the chunk's 13 tiles
    x 7 parts x 16 lines cover the next panel's 1,456 lines (728 x 32 floats). A KxK
    window and short reductions get none; the tuner also times the default without."""
    import re

    from tvm import s_tir

    from xcompile.schedules.analysis import match_conv2d_nhwc
    from xcompile.schedules.cpu.conv_gemm import gemm_configs, prefetch_parts

    assert [prefetch_parts(s) for s in (182, 256, 384, 48, 47, 16)] == [7, 8, 16, 2, 0, 0]
    configs = gemm_configs(361, 728, 16, 32, 2, 728)
    assert (configs[0].mb, configs[0].streams, configs[0].prefetch) == (13, 4, 7)
    assert any(c.prefetch == 0 for c in configs)
    assert all(c.prefetch == 0 for c in gemm_configs(361, 728, 16, 32, 2, 728, window=9))

    func = conv_kernel(728, 728, size=19)
    sch = s_tir.Schedule(func)
    PackedConvGEMM._schedule(sch, match_conv2d_nhwc(sch), configs[0], 16)
    done = finished(sch.mod["main"])
    text = done.script()
    assert re.search(r"for prefetch_line in range\(T\.int64\(16\)\)", text)
    # One prefetch of the next panel; the write-back's two (a vector's first and last
    # lane of the output: ``epilogue_prefetch``).
    assert text.count("T.prefetch(") == 3
    assert len(re.findall(r"for prefetch_line in range[^\n]*\n\s*T\.prefetch\(", text)) == 1
    assert finished(done).same_as(done)  # marks removed
    # Unmarked kernels pass through unchanged.
    assert finished(func).same_as(func)


class _Residual(nn.Module):
    """A 1x1 conv with batch norm and a residual add (Xception's middle-flow ending)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(self.conv(x)) + x


def test_tiles_prefetch_their_write_back():
    """Each tile, as it starts, prefetches the lines its write-back will touch
    (``epilogue_prefetch``): the output's for writing and the residual's for reading, a
    vector's first and last lane for every row and vector of the tile, not the bias's
    (the same lines for every row), under the write-back's predicate where the rows or
    channels are padded; the kernel computes what the unscheduled one does, and the
    machine code has the write prefetches."""
    import re

    from tvm import s_tir

    from xcompile.schedules.analysis import match_conv2d_nhwc
    from xcompile.schedules.cpu.target_info import cpu_info

    target = HOST.tvm_target()
    # 36 channels: no whole vectors of 8 or 16 lanes, so the channels pad on both x86
    # presets (and the write-back has a predicate) whichever this host runs.
    kernels = lowered_kernels(_Residual(36), (1, 36, 13, 13))
    (name, func), = [(n, f) for n, f in kernels.items() if "conv2d" in n]
    sch = s_tir.Schedule(func)
    conv = match_conv2d_nhwc(sch)
    config = PackedConvGEMM().configs(conv, target)[0]
    PackedConvGEMM._schedule(sch, conv, config, cpu_info(target).lanes)
    text = finished(sch.mod["main"]).script()
    # The parameters: the conv's input, weights and bias, the residual (the same tensor
    # as the input in the graph, a parameter of its own here), the output.
    params = re.findall(r"(\w+): T\.Buffer", text.split("def main", 1)[1].split("\n")[0])
    assert len(params) == 5, params
    residual, out = params[-2], params[-1]
    fetched = re.findall(r"T\.prefetch\(T\.address_of\((\w+)\[[^\n]*\]\), (\d), 2, 1\)",
                         text)
    assert sorted(set(fetched)) == sorted({(out, "1"), (residual, "0")}), fetched
    assert len(fetched) == 4  # two lanes of each
    # The padded channels: the write-back's predicate guards its prefetches.
    assert re.search(r"_pf[^\n]*<[^\n]*\n\s*T\.prefetch\(", text), text
    assert_computes_the_same(func, sch.mod["main"])
    assert "prefetchw" in _asm(func, "x86-avx512")  # (Haswell, AVX2's CPU, has none)
    assert "pstl2keep" in _asm(func, "arm64-neon")


def test_prefetching_tiles_compute_the_same_and_prefetch():
    """The default schedule of a pointwise conv with a deep reduction and weights too
    large to run tile-major, built as a build builds it, gives the unscheduled result,
    and its machine code prefetches (into L2 on x86)."""
    from tvm import s_tir

    from xcompile.schedules.analysis import match_conv2d_nhwc
    from xcompile.schedules.cpu.conv_gemm import TILE_MAJOR_MAX_BYTES
    from xcompile.schedules.cpu.target_info import cpu_info

    cin = 256
    cout = TILE_MAJOR_MAX_BYTES // (4 * cin) + 16  # weights just over the limit
    func = conv_kernel(cin=cin, cout=cout, size=5)
    sch = s_tir.Schedule(func)
    conv = match_conv2d_nhwc(sch)
    config = PackedConvGEMM().configs(conv, HOST.tvm_target())[0]
    assert not config.tile_major and config.prefetch > 1
    PackedConvGEMM._schedule(sch, conv, config, cpu_info(HOST.tvm_target()).lanes)
    assert_computes_the_same(func, sch.mod["main"])
    assert "prefetcht1" in _asm(func, "x86-avx2")


def test_pointwise_tiles_read_the_input_rows_in_place():
    """A 1x1 stride-1 conv's tiles read the input rows where they lie (no packed copy);
    its pixel rows, padded to whole tiles, read the last row instead of a guarded load
    (the pass that finishes kernels), and it gives the unscheduled result. Strided and
    zero-padded convs keep the packed panel, and so does an input too large to come from
    the caches; the tuner also times the packed one."""
    from dataclasses import replace

    from tvm import s_tir

    from xcompile.schedules.analysis import match_conv2d_nhwc
    from xcompile.schedules.cpu.conv_gemm import gemm_configs, rows_crowd_l1
    from xcompile.schedules.cpu.target_info import cpu_info

    target = HOST.tvm_target()

    def default(func):
        conv = match_conv2d_nhwc(s_tir.Schedule(func))
        return conv, PackedConvGEMM().configs(conv, target)

    assert not default(conv_kernel(64, 48, size=13, stride=2))[1][0].direct
    assert not default(conv_kernel(16, 48, size=13, k=3, pad=1))[1][0].direct
    assert not default(conv_kernel(16, 48, size=13, k=3, stride=2))[1][0].direct
    # 128 channels of 147x147 pixels: 11 MB in place, 22 MB (two of them) packed.
    assert gemm_configs(147 * 147, 128, 16, 32, 2, 128, direct=True)[0].direct
    assert not gemm_configs(2 * 147 * 147, 128, 16, 32, 2, 128, direct=True)[0].direct
    func = conv_kernel(64, 48, size=13)  # 169 rows: padded to whole tiles
    conv, configs = default(func)
    assert conv.rows_in_place and configs[0].direct
    assert any(not c.direct for c in configs)
    # The tuner times the default packed, without the panel prefetch, and both at once
    # (on a Zen 4 the 19x19x728 GEMMs ran 0.978x as long in the model with both).
    first = gemm_configs(2888, 728, 16, 32, 2, 728, direct=True)
    assert first[0].direct and first[0].prefetch
    for change in ({"direct": False}, {"prefetch": 0}, {"direct": False, "prefetch": 0}):
        assert replace(first[0], **change) in first, change
    # 1024 channels are 4 KiB a row: a 14-row tile's rows in place would all fall into
    # one set of a 64-set, 8-way L1 (four, one a stream): such tiles are packed, 728
    # channels (2,912 bytes a row) spread; an 8-row tile of 1024 fits the 8 ways.
    assert rows_crowd_l1(1024, 14, 4, 64, 8) and rows_crowd_l1(1024, 9, 1, 64, 8)
    assert not rows_crowd_l1(728, 14, 4, 64, 8) and not rows_crowd_l1(1024, 8, 4, 64, 8)
    assert rows_crowd_l1(4096, 3, 4, 64, 8)  # the streams 4 KiB apart too: 12 in a set
    assert not rows_crowd_l1(1024, 14, 4, 0, 0)  # no L1 given: no check
    crowded = gemm_configs(392, 1024, 16, 32, 2, 1024, direct=True, l1_sets=64, l1_ways=8)
    assert crowded[0].mr > 8 and not crowded[0].direct
    assert all(c.direct == (c.mr <= 8) for c in crowded if c.groups == 1 and c.mr != 14)
    assert gemm_configs(392, 1024, 16, 32, 2, 1024, direct=True)[0].direct
    sch = s_tir.Schedule(func)
    # Chunks of 2 tiles: 169 (odd) rows then always pad, whatever tile this CPU gets.
    PackedConvGEMM._schedule(sch, match_conv2d_nhwc(sch), replace(configs[0], mb=2),
                             cpu_info(target).lanes)
    assert_computes_the_same(func, sch.mod["main"])
    done = finished(sch.mod["main"])
    text = done.script()
    assert "T.if_then_else" not in text and "T.int64(168))" in text  # min(row, 168)
    # The marks go with the rewrite: finishing twice changes nothing.
    assert finished(done).same_as(done)
    # One pixel row (a squeeze-excite FC as a 1x1 conv): TVM gives the padded rows the
    # real row's accumulator, so their reads keep the guard, even when forced in place.
    func = conv_kernel(32, 8, size=1)
    conv, configs = default(func)
    assert not configs[0].direct
    sch = s_tir.Schedule(func)
    PackedConvGEMM._schedule(sch, match_conv2d_nhwc(sch), replace(configs[0], direct=True),
                             cpu_info(target).lanes)
    assert_computes_the_same(func, sch.mod["main"])


@pytest.mark.parametrize("batch", [1, 2])
def test_window_tiles_read_the_input_rows_in_place(batch):
    """A KxK stride-1 conv without padding (Xception's second stem conv) reads each
    window position's rows where they lie, a fixed offset from the output pixel's:
    no im2col copy, and the unscheduled result, with the rows padded to whole tiles
    (121 a image, whose rows at batch 2 run on into the second image), the padded rows
    reading the last row unguarded; 1x3 and 3x1 windows too."""
    from dataclasses import replace

    from tvm import s_tir

    from xcompile.schedules.analysis import match_conv2d_nhwc
    from xcompile.schedules.cpu.target_info import cpu_info

    lanes = cpu_info(HOST.tvm_target()).lanes
    for k in (3, (1, 3), (3, 1)):
        func = conv_kernel(16, 48, size=13, k=k, batch=batch)
        sch = s_tir.Schedule(func)
        conv = match_conv2d_nhwc(sch)
        configs = PackedConvGEMM().configs(conv, HOST.tvm_target())
        assert conv.rows_in_place and configs[0].direct, k
        assert any(not c.direct for c in configs)  # the tuner times the packed one too
        PackedConvGEMM._schedule(sch, conv, replace(configs[0], mb=2), lanes)
        assert_computes_the_same(func, sch.mod["main"])
        text = finished(sch.mod["main"]).script()
        rows = batch * (13 - conv.kernel[0] + 1) * (13 - conv.kernel[1] + 1)
        assert "T.if_then_else" not in text and f"T.int64({rows - 1}))" in text, k
        # No packed input: the kernel allocates its accumulators and the packed weights
        # (lifted out at build time), where the packed configuration adds the panel.
        assert _allocations(text) == 2, text
        packed = s_tir.Schedule(func)
        PackedConvGEMM._schedule(packed, match_conv2d_nhwc(packed),
                                 replace(configs[0], mb=2, direct=False), lanes)
        assert _allocations(packed.mod["main"].script()) == 3


def _allocations(text: str) -> int:
    return text.count("T.sblock_alloc_buffer(")


@pytest.mark.parametrize("groups", [1, 2])
def test_in_place_prefetching_tiles_at_batch_2_compute_the_same(groups):
    """Batch 2 (rows of two images, padded), output channels in one or two parallel
    groups (each group prefetching within its own panels), the input rows in place and
    the weight-panel prefetch on: the unscheduled result."""
    from dataclasses import replace

    from tvm import s_tir

    from xcompile.schedules.analysis import match_conv2d_nhwc
    from xcompile.schedules.cpu.target_info import cpu_info

    func = conv_kernel(cin=192, cout=128, size=9, batch=2)
    sch = s_tir.Schedule(func)
    conv = match_conv2d_nhwc(sch)
    lanes = cpu_info(HOST.tvm_target()).lanes
    config = PackedConvGEMM().configs(conv, HOST.tvm_target())[0]
    config = replace(config, groups=groups, mb=2, direct=True, prefetch=2)
    PackedConvGEMM._schedule(sch, conv, config, lanes)
    assert_computes_the_same(func, sch.mod["main"])


def test_small_weights_run_tile_major():
    """Where all the weights fit TILE_MAJOR_MAX_BYTES, each tile runs through every
    weight panel by default (no panel prefetch then), and the tuner also times the other
    order, with the prefetch; larger weights the other way round. The limit, not this
    host, decides."""
    from xcompile.schedules.cpu.conv_gemm import TILE_MAJOR_MAX_BYTES, gemm_configs

    def configs(depth, channels):
        return gemm_configs(147 * 147, channels, 16, 32, 2, depth, direct=True)

    small = configs(128, 128)  # Xception's entry flow: 64 KB of weights
    assert 128 * 128 * 4 <= TILE_MAJOR_MAX_BYTES
    assert small[0].tile_major and small[0].prefetch == 0
    assert all(c.prefetch == 0 for c in small if c.tile_major)
    assert any(not c.tile_major for c in small)
    depth = 728
    channels = TILE_MAJOR_MAX_BYTES // (4 * depth) + 16
    large = configs(depth, channels)
    assert not large[0].tile_major and large[0].prefetch > 1
    assert any(c.tile_major and c.prefetch == 0 for c in large)


def test_configurations_keep_the_keys_older_logs_timed():
    """A field added to the GEMM configuration after logs were shipped is left out of
    its JSON at its default, so a configuration an older log timed has the same key
    (this one, as the shipped x86-avx512 log wrote it), and reads back the same."""
    from dataclasses import replace

    from xcompile.schedules import config_json_key
    from xcompile.schedules.cpu.conv_gemm import GEMMTile

    rule = PackedConvGEMM()
    config = GEMMTile(mr=14, nu=2, mb=13, groups=1, streams=4, prefetch=7, direct=True)
    assert config_json_key(rule.config_to_json(config)) == (
        '{"direct": true, "groups": 1, "mb": 13, "mr": 14, "nu": 2, "prefetch": 7, '
        '"streams": 4}')
    assert rule.config_from_json(rule.config_to_json(config)) == config
    major = replace(config, tile_major=True, prefetch=0)
    assert rule.config_to_json(major)["tile_major"] is True
    assert rule.config_from_json(rule.config_to_json(major)) == major


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("direct", [True, False], ids=["in-place", "packed"])
def test_tile_major_tiles_compute_the_same(groups, direct):
    """Each tile through every weight panel, in one or two channel groups, the input
    rows in place or packed, rows and channels padded (169 rows, 40 channels): the
    unscheduled result."""
    from dataclasses import replace

    from tvm import s_tir

    from xcompile.schedules.analysis import match_conv2d_nhwc
    from xcompile.schedules.cpu.target_info import cpu_info

    func = conv_kernel(cin=64, cout=40 * groups, size=13)
    sch = s_tir.Schedule(func)
    conv = match_conv2d_nhwc(sch)
    config = PackedConvGEMM().configs(conv, HOST.tvm_target())[0]
    config = replace(config, groups=groups, mb=2, direct=direct, tile_major=True,
                     prefetch=0)
    PackedConvGEMM._schedule(sch, conv, config, cpu_info(HOST.tvm_target()).lanes)
    # The loop over a chunk's tiles (rows: ax0, split into chunk, tile, row) outside the
    # loop over the weight panels (channels: ax1, split into [group,] panel, vector, lane).
    loops = [str(sch.get(loop).loop_var) for loop in sch.get_loops(conv.block)]
    rows = [v for v in loops if v.startswith("ax0")]
    channels = [v for v in loops if v.startswith("ax1")]
    assert len(rows) == 3 and loops.index(rows[1]) < loops.index(channels[-3])
    assert_computes_the_same(func, sch.mod["main"])


@pytest.mark.parametrize("streams", [1, 8])
def test_reduction_streams_compute_the_same(streams):
    """Any stream count, not only the default one, gives the unscheduled result."""
    from dataclasses import replace

    from tvm import s_tir

    from xcompile.schedules.analysis import match_conv2d_nhwc
    from xcompile.schedules.cpu.conv_gemm import gemm_configs
    from xcompile.schedules.cpu.target_info import cpu_info

    func = conv_kernel(cin=64, cout=48, size=13)
    sch = s_tir.Schedule(func)
    conv = match_conv2d_nhwc(sch)
    info = cpu_info(HOST.tvm_target())
    lanes, registers = info.lanes, info.registers
    config = replace(gemm_configs(169, 48, lanes, registers, 2, 64)[0], streams=streams)
    PackedConvGEMM._schedule(sch, conv, config, lanes)
    assert_computes_the_same(func, sch.mod["main"])


def test_a_failing_rule_falls_through_to_the_next(caplog):
    import tvm

    from xcompile import schedules

    class Broken:
        name = "broken"

        def apply(self, func, target, tunable):
            raise RuntimeError("boom")

    mod = tvm.IRModule({"k": conv_kernel(64, 128, size=19)})
    with HOST.tvm_target():
        out = schedules.apply_rules([Broken(), Fallback()])(mod)
    assert schedules.kernel_rules(out) == {"k": "xcompile.cpu.Fallback"}
    assert "broken failed on k" in caplog.text


@pytest.mark.parametrize("lanes,registers", [(16, 32), (4, 32)], ids=["avx512-tiles", "neon-tiles"])
@pytest.mark.parametrize("case", [dict(cin=728, cout=728, size=19),
                                  dict(cin=13, cout=24, size=17, k=5, stride=2, pad=2)],
                         ids=["pw-728", "odd-k5"])
def test_other_isas_tilings_compute_the_same(lanes, registers, case):
    """AVX-512 and NEON tile choices, run here: compiled for this CPU, wider or narrower
    vectors are split or widened by LLVM, so the schedule's logic is what is tested."""
    from tvm import s_tir

    from xcompile.schedules.analysis import match_conv2d_nhwc
    from xcompile.schedules.cpu.conv_gemm import gemm_configs

    func = conv_kernel(**case)
    sch = s_tir.Schedule(func)
    conv = match_conv2d_nhwc(sch)
    n, h, w, f = conv.out_shape
    config = gemm_configs(n * h * w, f, lanes, registers, 4, conv.in_channels)[0]
    PackedConvGEMM._schedule(sch, conv, config, lanes)
    assert_computes_the_same(func, sch.mod["main"])


@pytest.mark.parametrize("outer", [True, False], ids=["channels-outer", "pixels-outer"])
@pytest.mark.parametrize("lanes", [16, 4], ids=["avx512-lanes", "neon-lanes"])
def test_other_isas_depthwise_computes_the_same(lanes, outer):
    from tvm import s_tir

    from xcompile.schedules.analysis import match_conv2d_nhwc
    from xcompile.schedules.cpu.depthwise import DepthwiseTile

    func = conv_kernel(48, 48, size=31, k=5, stride=2, pad=2, groups=48, act=nn.SiLU)
    sch = s_tir.Schedule(func)
    VectorDepthwise._schedule(sch, match_conv2d_nhwc(sch), lanes,
                              DepthwiseTile(1, 3, channels_outer=outer))
    assert_computes_the_same(func, sch.mod["main"])


@pytest.mark.parametrize("lanes,registers", [(16, 32), (4, 32)], ids=["avx512-tiles", "neon-tiles"])
def test_other_isas_separable_computes_the_same(lanes, registers):
    from tvm import s_tir

    from xcompile.schedules.analysis import match_separable
    from xcompile.schedules.cpu.conv_gemm import gemm_configs
    from xcompile.schedules.cpu.separable import SeparableConv

    func = separable_kernel(c=48, cout=40, size=13, between=True, act=nn.SiLU)
    sch = s_tir.Schedule(func)
    sep = match_separable(sch)
    n, h, w, f = sep.pointwise.out_shape
    config = gemm_configs(n * h * w, f, lanes, registers, 4, sep.pointwise.in_channels)[0]
    SeparableConv._schedule(sch, sep, config, lanes)
    assert_computes_the_same(func, sch.mod["main"])


def test_neon_separable_instructions():
    """The fused kernel cross-compiled for ARM: NEON FMAs on 4-lane vectors."""
    asm = _asm(separable_kernel(c=64, cout=64, size=19), "arm64-neon", SeparableConv())
    assert asm.count("fmla\tv") > 10 and ".4s" in asm
