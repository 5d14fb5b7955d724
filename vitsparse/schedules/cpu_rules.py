"""Hand-written CPU schedule rules (the dlight contract: apply(func, target, tunable) returns a
Schedule, or None when the rule does not apply).

- DenseKernelRule: the packed dense kernel of schedules/dense.py with its default knobs.
- BSRKernelRule: the block-sparse kernel of schedules/bsr.py with its default knobs.
- PairedDenseKernelRule: the int8 dense kernel of schedules/paired.py (tensorized) with its default
  knobs. (The int8 BSR kernel comes scheduled.)
- BatchMatmulRule: attention's batched matmuls (and any other einsum-shaped matmul): rows and
  columns padded to the register tile, broadcast-FMA inner loop like the dense kernel.
- ParallelVectorizeRule: everything else (layernorm, softmax, elementwise, layout copies):
  inline what can be inlined, run the outer loops in parallel, vectorise the inner loop.
"""

from __future__ import annotations

from vitsparse._tvm import Schedule, dlight, tir
from vitsparse.schedules import bsr, dense, paired

_VECTOR = 16


def _extent(sch: Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tir.IntImm) else None


class DenseKernelRule(dlight.ScheduleRule):
    """The dense linear kernel, scheduled with its hand-picked knobs."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tir.PrimFunc) or not dense.is_dense_kernel(func):
            return None
        sch = Schedule(func)
        dense.schedule_dense_cpu(sch, dense.default_knobs(dense.shape_of(func)))
        return sch


class BSRKernelRule(dlight.ScheduleRule):
    """The block-sparse linear kernel, scheduled with its hand-picked knobs for the target's
    vector width."""

    def apply(self, func, target, tunable):
        if not bsr.is_bsr_kernel(func):
            return None
        sch = Schedule(func)
        shape = bsr.shape_of(func)
        bsr.schedule_bsr_cpu(sch, bsr.default_knobs(shape), bsr.vector_lanes(target))
        return sch


class PairedDenseKernelRule(dlight.ScheduleRule):
    """The int8 dense linear kernel, scheduled with its hand-picked knobs."""

    def apply(self, func, target, tunable):
        if not paired.is_dense_kernel(func):
            return None
        sch = Schedule(func)
        paired.schedule_dense_cpu(sch, paired.default_dense_knobs(paired.dense_shape_of(func)))
        return sch


def _matmul_block(sch: Schedule):
    """The one reduction block of a matmul: C[b.., i, j] += A[b.., i, k] * B[b.., k, j]."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = []
    for block in blocks:
        stmt = sch.get(block)
        kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
        if 2 in kinds:  # CommReduce
            reductions.append(block)
    if len(reductions) != 1:
        return None
    block = reductions[0]
    stmt = sch.get(block)
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    if kinds[-1] != 2 or kinds.count(2) != 1 or len(kinds) < 3 or len(stmt.reads) < 2:
        return None
    body = stmt.body
    if not isinstance(body, tir.BufferStore) or not isinstance(body.value, tir.Add):
        return None
    # Read as A[.., i, k] and B[.., k, j]: the columns of B are contiguous.
    i_var, j_var, k_var = (iv.var for iv in stmt.iter_vars[-3:])
    inputs = [r for r in stmt.reads if not r.source.same_as(body.buffer)]
    if len(inputs) != 2:
        return None

    def last_two(region):
        mins = [rng.min for rng in region.region[-2:]]
        return mins if all(isinstance(v, tir.Var) for v in mins) else None

    a_idx, b_idx = last_two(inputs[0]), last_two(inputs[1])
    if a_idx is None or b_idx is None:
        return None
    if not (
        a_idx[0].same_as(i_var)
        and a_idx[1].same_as(k_var)
        and b_idx[0].same_as(k_var)
        and b_idx[1].same_as(j_var)
    ):
        return None
    return block


class BatchMatmulRule(dlight.ScheduleRule):
    """Batched matmul with row-major right operand, padded to an (8 x 32) register tile."""

    row_tile = 6
    col_tile = 32

    def apply(self, func, target, tunable):
        if not isinstance(func, tir.PrimFunc):
            return None
        sch = Schedule(func)
        block = _matmul_block(sch)
        if block is None:
            return None
        loops = sch.get_loops(block)
        extents = [_extent(sch, lp) for lp in loops]
        if None in extents:
            return None
        pad = [1] * (len(loops) - 3) + [self.row_tile, self.col_tile, 1]
        try:
            sch.pad_einsum(block, pad)
        except Exception:  # noqa: BLE001  (not an einsum after all: let the fallback take it)
            return None
        # Epilogue (bias, scale...) and padding copies: inline where possible.
        consumers = sch.get_consumers(block)
        for c in consumers:
            _try_reverse_inline(sch, c)
        loops = sch.get_loops(block)
        *batch, i, j, k = loops
        j_ext = _extent(sch, j)
        cols = self.col_tile if j_ext % self.col_tile == 0 else _VECTOR
        i_o, i_i = sch.split(i, [None, self.row_tile])
        j_o, j_v, j_l = sch.split(j, [None, cols // _VECTOR, _VECTOR])
        sch.reorder(*batch, i_o, j_o, k, i_i, j_v, j_l)
        outer = sch.fuse(*batch, i_o, j_o)
        sch.parallel(outer)
        acc = sch.cache_write(block, 0, "global")
        sch.reverse_compute_at(acc, outer)
        sch.vectorize(j_l)
        sch.unroll(j_v)
        sch.unroll(i_i)
        sch.decompose_reduction(block, k)
        a_loops = sch.get_loops(acc)
        _vectorize_inner(sch, a_loops[-1])
        for blk in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(blk).same_as(sch.get(block)) or not _is_top_level(sch, blk):
                continue
            _parallel_vectorize(sch, blk)
        return sch


def _is_top_level(sch, block) -> bool:
    loops = sch.get_loops(block)
    if not loops:
        return False
    return sch.get(loops[0]).kind == tir.ForKind.SERIAL


def _try_reverse_inline(sch, block):
    try:
        sch.reverse_compute_inline(block)
    except Exception:  # noqa: BLE001  (not inlinable: keep it as its own loop nest)
        pass


def _vectorize_inner(sch, loop):
    ext = _extent(sch, loop)
    if ext is None:
        return
    for lanes in (_VECTOR, 8, 4):
        if ext % lanes == 0:
            if ext > lanes:
                _, loop = sch.split(loop, [None, lanes])
            sch.vectorize(loop)
            return


def _parallel_vectorize(sch: Schedule, block) -> None:
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    spatial = []
    for lp, iv in zip(loops, stmt.iter_vars, strict=False):
        if int(iv.iter_type) != 0:
            break
        spatial.append(lp)
    if not spatial:
        return
    all_spatial = len(spatial) == len(loops) and all(
        int(iv.iter_type) == 0 for iv in stmt.iter_vars
    )
    if all_spatial and len(loops) > 1:
        inner = loops[-1]
        outer = sch.fuse(*loops[:-1])
        sch.parallel(outer)
        _vectorize_inner(sch, inner)
    elif all_spatial:
        ext = _extent(sch, loops[0])
        if ext and ext > 64 and ext % _VECTOR == 0:
            o, i = sch.split(loops[0], [None, _VECTOR])
            sch.parallel(o)
            sch.vectorize(i)
        else:
            sch.parallel(loops[0])
    else:
        sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])


class RowReductionRule(dlight.ScheduleRule):
    """Row-wise reductions (layernorm, softmax and their fused epilogues): one parallel loop over
    rows, every stage of a row computed inside it while the row is in cache; a stage two later
    stages read is computed once per row, not inlined into both."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tir.PrimFunc):
            return None
        sch = Schedule(func)
        root = sch.get_sblock("root")
        has_reduction = any(
            2 in [int(iv.iter_type) for iv in sch.get(b).iter_vars]
            for b in sch.get_child_blocks(root)
        )
        if not has_reduction:
            return None
        infos = dlight.analysis.normalize_prim_func(sch)
        if infos is None:
            return None
        # A stage read by two later stages (softmax's exp: by the sum and by the division) is
        # computed once per row into a row buffer rather than inlined into both.
        once = [i for i in infos if len(sch.get_consumers(i.block_rv)) < 2]
        dlight.try_inline_contiguous_spatial(sch, once)
        blocks = sch.get_child_blocks(root)
        last = blocks[-1]
        stmt = sch.get(last)
        if any(int(iv.iter_type) != 0 for iv in stmt.iter_vars) or len(sch.get_loops(last)) < 2:
            return None
        loops = sch.get_loops(last)
        row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        try:
            for block in reversed(blocks[:-1]):
                sch.compute_at(block, row, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001  (stages do not share the row loops)
            return None
        sch.parallel(row)
        for block in _all_blocks(sch):
            stmt = sch.get(block)
            inner = sch.get_loops(block)[-1]
            if int(stmt.iter_vars[-1].iter_type) == 0 and len(stmt.iter_vars) > 0:
                _vectorize_inner(sch, inner)
        return sch


def _all_blocks(sch: Schedule):
    out = []
    stack = [sch.get_sblock("root")]
    while stack:
        children = sch.get_child_blocks(stack.pop())
        out.extend(children)
    return out


class ParallelVectorizeRule(dlight.ScheduleRule):
    """Fallback: inline injective producers, then parallel outer / vectorised inner loops."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tir.PrimFunc):
            return None
        sch = Schedule(func)
        root = sch.get_sblock("root")
        dlight.try_inline_contiguous_spatial(sch, dlight.analysis.normalize_prim_func(sch) or [])
        for block in sch.get_child_blocks(root):
            if sch.get_loops(block):
                _parallel_vectorize(sch, block)
        return sch


def default_rules() -> list[dlight.ScheduleRule]:
    """The CPU rules in priority order."""
    return [
        DenseKernelRule(),
        PairedDenseKernelRule(),
        BSRKernelRule(),
        BatchMatmulRule(),
        RowReductionRule(),
        ParallelVectorizeRule(),
    ]
