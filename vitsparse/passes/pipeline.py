"""The compile pipeline, assembled in one place in named phases (like TVM's relax/pipeline.py):

    bind      weights become constants, so weight transposes and packing fold at compile time
    rewrite   structural rewrites: linear layers -> packed dense kernels (+ fused GELU)
    legalize  remaining Relax ops -> TensorIR, with fast-math GELU
    fuse      constant folding, operator fusion, FuseTIR
    schedule  tuned records from the database, hand-written rules for whatever they miss
    build     tvm.compile's lowering to the VM executable

`build_pipeline` returns a tvm.transform.Sequential per phase; `dump_dir` writes the module after
each phase (debug option).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitsparse._tvm import IRModule, dlight, relax, tir, topi, tvm
from vitsparse.passes.lower_linear import LowerLinear
from vitsparse.passes.patch_embed_to_dense import PatchEmbedToDense

TUNED_ATTR = "vitsparse.tuned"


def _legalize_gelu_fast(bb, call):
    # Exact-erf GELU through TVM's vectorisable fast erf (libm erf is a scalar call per element).
    def gelu(x):
        return topi.multiply(
            x,
            topi.add(0.5, topi.multiply(0.5, topi.fast_erf(topi.multiply(x, 0.7071067811865476)))),
        )

    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


@dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline needs to know besides the module."""

    target: tvm.target.Target
    schedule_family: str = "cpu"  # 'cpu' | 'gpu'
    database: object | None = None  # a MetaSchedule Database, or None
    lower_linear: bool = True
    block_sparsify: tvm.transform.Pass | None = None  # BlockSparsify, when a plan is compiled
    dump_dir: Path | None = None
    extra_phases: dict = field(default_factory=dict)


def structural_passes(structure, graph, masked_layers=()) -> tvm.transform.Pass:
    """The structural rewrite phase for a plan's structure, in the order the passes compose:
    embedding channels, heads, MLP neurons, then tokens (whose pass needs the others' shapes).
    ``masked_layers``: the plan's block-masked layer names (checked for compatibility)."""
    from vitsparse.passes.prune_embedding import PruneEmbedding
    from vitsparse.passes.prune_heads import PruneHeads, check_supported
    from vitsparse.passes.prune_mlp import PruneMLP
    from vitsparse.passes.prune_tokens import PruneTokens

    check_supported(structure, masked_layers)  # fails here, before any pass runs
    return tvm.transform.Sequential(
        [cls(structure, graph) for cls in (PruneEmbedding, PruneHeads, PruneMLP, PruneTokens)],
        name="structure",
    )


def bind_params(mod: IRModule, params: dict[str, np.ndarray], func: str = "main") -> IRModule:
    """Turn main's weight parameters into constants (the input stays a parameter), narrowed
    first as the structural passes recorded (``passes._structure``)."""
    from vitsparse.passes._structure import slice_params

    bound = {k: tvm.runtime.tensor(v) for k, v in slice_params(mod, params, func).items()}
    return relax.transform.BindParams(func, bound)(mod)


def phases(config: PipelineConfig) -> list[tuple[str, tvm.transform.Pass]]:
    """(name, pass) for each phase after binding, in order."""
    rewrite = []
    if config.block_sparsify is not None:
        rewrite.append(config.block_sparsify)
    # Folds what the rewrites left of pruning annotations (masked weights kept dense).
    rewrite.append(relax.transform.FoldConstant())
    if config.lower_linear and config.schedule_family == "cpu":
        rewrite += [PatchEmbedToDense(), LowerLinear(), relax.transform.RemoveRedundantReshape()]
    out = [
        ("rewrite", tvm.transform.Sequential(rewrite, name="rewrite")),
        (
            "legalize",
            tvm.transform.Sequential(
                [
                    # Before legalization: it swaps Relax exp/softmax/erf for topi's fast forms.
                    relax.transform.FastMathTransform(),
                    relax.transform.LegalizeOps(
                        customize_legalize_map={"relax.nn.gelu": _legalize_gelu_fast}
                    ),
                ],
                name="legalize",
            ),
        ),
        (
            "fuse",
            tvm.transform.Sequential(
                [
                    relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(),
                    relax.transform.FuseOps(),
                    relax.transform.FuseTIR(),
                    relax.transform.DeadCodeElimination(),
                    relax.transform.RewriteDataflowReshape(),
                ],
                name="fuse",
            ),
        ),
        ("schedule", _schedule_phase(config)),
    ]
    return out


def _schedule_phase(config: PipelineConfig) -> tvm.transform.Pass:
    passes = []
    if config.database is not None:
        passes.append(_ApplyDatabase(config.database, config.target))
    if config.schedule_family == "cpu":
        from vitsparse.schedules.cpu_rules import default_rules

        passes.append(dlight.ApplyDefaultSchedule(*default_rules()))
    else:
        from vitsparse.schedules.gpu_rules import default_rules

        passes.append(dlight.ApplyDefaultSchedule(*default_rules()))
    return tvm.transform.Sequential(passes, name="schedule")


@tvm.transform.module_pass(opt_level=0, name="vitsparse.ApplyDatabase")
class _ApplyDatabase:
    """MetaScheduleApplyDatabase with the database given explicitly (not from a context)."""

    def __init__(self, database, target):
        self.database = database
        self.target = target

    def transform_module(self, mod, _ctx):
        with self.target, self.database:
            out = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        for gvar, func in list(out.functions.items()):
            if not isinstance(func, tir.PrimFunc) or gvar.name_hint not in _names(mod):
                continue
            if not func.same_as(mod[gvar.name_hint]):
                out[gvar] = func.with_attr(TUNED_ATTR, True)
        return out


def _names(mod) -> set[str]:
    return {gv.name_hint for gv in mod.functions}


def count_tuned(mod: IRModule) -> int:
    """How many kernels of ``mod`` got their schedule from the tuning database."""
    return sum(
        1
        for func in mod.functions.values()
        if isinstance(func, tir.PrimFunc) and func.attrs is not None and TUNED_ATTR in func.attrs
    )


def optimize(mod: IRModule, config: PipelineConfig, *, stop_before: str | None = None) -> IRModule:
    """Run every phase (up to ``stop_before``) on a module whose weights are already bound."""
    with config.target:
        for name, phase in phases(config):
            if name == stop_before:
                break
            mod = phase(mod)
            if config.dump_dir is not None:
                config.dump_dir.mkdir(parents=True, exist_ok=True)
                (config.dump_dir / f"{name}.py").write_text(mod.script(show_meta=False))
    return mod


def build(mod: IRModule, config: PipelineConfig):
    """optimize + tvm.compile to a Relax VM executable."""
    mod = optimize(mod, config)
    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target=config.target)
