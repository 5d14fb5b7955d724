"""The compile pipeline, assembled in one place from the plan and the target, in named phases
(like TVM's relax/pipeline.py, and registered beside its pipelines as ``"vitsparse"``):

    structure  the plan's structure: embedding channels, heads, MLP neurons, tokens (narrower
               weight parameters, shapes that follow, static top-k)
    annotate   the plan's block masks written into the IR (AnnotatePruning); for int8, the
               quantized layers' inputs fake-quantized (AnnotateQuantization); for bf16,
               rounded to bf16 or fp16 (AnnotateHalf)
    bind       weights become constants (sliced as the structure recorded), so weight
               transposes, masks and packing fold at compile time
    sparsify   annotated layers below their break-even density -> BSR kernels; masks left dense
               fold into their weights
    lower      linear layers -> packed dense kernels (+ fused GELU) on CPU targets; int8,
               bf16 or fp16 kernels (`schedules.paired`) where the input is annotated so;
               on GPU targets, the annotated layers -> int8 or fp16 matmuls (tensor cores)
    legalize   remaining Relax ops -> TensorIR, with fast-math GELU
    fuse       constant folding, operator fusion, FuseTIR
    schedule   tuned records from the database, hand-written rules for whatever they miss

`build_pipeline` returns the whole ``tvm.transform.Sequential``; `optimize` runs it (or up to a
phase), writing the module after every phase with a dump directory; `compile_module` is the one
``tvm.compile`` of vitsparse, and `build` is both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitsparse import _tvm_intrin
from vitsparse._tvm import IRModule, dlight, relax, tir, topi, tvm
from vitsparse.frontend import ViTGraph
from vitsparse.passes._rewrite import RELAX_HALF_DTYPES
from vitsparse.passes.annotate_pruning import AnnotatePruning
from vitsparse.passes.annotate_quantization import AnnotateHalf, AnnotateQuantization
from vitsparse.passes.bind_weights import BindWeights, bind_params
from vitsparse.passes.block_sparsify import BlockSparsify, BreakEven
from vitsparse.passes.lower_linear import LowerLinear
from vitsparse.passes.patch_embed_to_dense import PatchEmbedToDense
from vitsparse.passes.prune_embedding import PruneEmbedding
from vitsparse.passes.prune_heads import PruneHeads, check_supported
from vitsparse.passes.prune_mlp import PruneMLP
from vitsparse.passes.prune_tokens import PruneTokens
from vitsparse.plan import PruningPlan
from vitsparse.plan.quantize import Quantization
from vitsparse.schedules import cpu_rules, gpu_rules, paired

PHASES = (
    "structure",
    "annotate",
    "bind",
    "sparsify",
    "lower",
    "legalize",
    "fuse",
    "schedule",
)
TUNED_ATTR = "vitsparse.tuned"
PIPELINE_NAME = "vitsparse"

__all__ = [
    "PHASES",
    "PipelineConfig",
    "bind_params",
    "build",
    "build_pipeline",
    "compile_module",
    "count_tuned",
    "optimize",
    "vitsparse_pipeline",
]


@dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline needs to know besides the module and its weights.

    ``plan`` (with the ``graph`` of the imported model it was made for) adds the structural,
    annotation and sparsify phases; ``break_even(m, k, n, block)`` is the density at or below
    which a masked layer becomes a BSR kernel (None: every masked layer does), and every
    masked layer's decision is appended to ``decisions``. ``database`` is a MetaSchedule
    database whose records the schedule phase applies first. ``precision`` names the
    reduced layers' arithmetic: ``"int8"`` needs ``quantization`` (the activation scales), the
    ``graph``, ``int8_lanes`` (the target's int8 kernel width) and ``int8_kernels`` (its int8
    kernel variant, `schedules.paired.INT8_VARIANTS`) on CPUs; ``"bf16"`` and ``"fp16"`` need
    ``half_layers`` (PyTorch layer names, `plan.quantize.quantized_layers`) and the ``graph``.
    """

    target: tvm.target.Target
    schedule_family: str = "cpu"  # 'cpu' | 'gpu'
    database: object | None = None
    lower_linear: bool = True
    plan: PruningPlan | None = None
    graph: ViTGraph | None = None
    break_even: BreakEven | None = None
    decisions: list = field(default_factory=list)
    dump_dir: Path | None = None
    quantization: Quantization | None = None
    int8_lanes: int = 0
    int8_kernels: str = "int8"
    precision: str = "fp32"
    half_layers: tuple[str, ...] = ()

    def __post_init__(self):
        if self.plan is not None and self.graph is None:
            raise ValueError("a pipeline with a plan needs the model's ViTGraph (graph=)")
        if self.quantization is not None and self.precision == "fp32":
            object.__setattr__(self, "precision", "int8")  # the scales say so
        lanes = self.int8_lanes or self.schedule_family == "gpu"  # GPUs: no lanes to give
        if self.precision == "int8" and (
            self.quantization is None or self.graph is None or not lanes
        ):
            raise ValueError("an int8 pipeline needs quantization, the ViTGraph and int8_lanes")
        if self.precision in RELAX_HALF_DTYPES and self.graph is None:
            raise ValueError(f"a {self.precision} pipeline needs the model's ViTGraph")

    @property
    def half(self) -> str:
        """The half precision of the reduced layers ("bf16" or "fp16"), "" in fp32 and int8."""
        return self.precision if self.precision in RELAX_HALF_DTYPES else ""


def _legalize_gelu_fast(bb, call):
    # Exact-erf GELU through TVM's vectorisable fast erf (libm erf is a scalar call per element).
    def gelu(x):
        return topi.multiply(
            x,
            topi.add(0.5, topi.multiply(0.5, topi.fast_erf(topi.multiply(x, 0.7071067811865476)))),
        )

    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


def _structure(config: PipelineConfig) -> list:
    plan = config.plan
    if plan is None or plan.structure is None or plan.structure.empty:
        return []
    check_supported(plan.structure, plan.layers)  # fails here, before any pass runs
    # In the order they compose: tokens last, its pass needs the others' shapes.
    passes = (PruneEmbedding, PruneHeads, PruneMLP, PruneTokens)
    return [cls(plan.structure, config.graph) for cls in passes]


def _sparsify(config: PipelineConfig) -> list:
    out = []
    if config.plan is not None:
        break_even = config.break_even or (lambda m, k, n, block: 1.0)
        out.append(
            BlockSparsify(
                break_even,
                config.decisions,
                int8_lanes=config.int8_lanes,
                int8_kernels=config.int8_kernels,
                half=config.half if config.schedule_family == "cpu" else "",
                gpu_precision=_gpu_precision(config),
            )
        )
    # Folds what the rewrites left of pruning annotations (masked weights kept dense).
    return out + [relax.transform.FoldConstant()]


def _gpu_precision(config: PipelineConfig) -> str:
    """The reduced precision of a GPU pipeline's annotated layers ("" on CPUs and in fp32)."""
    return (
        config.precision if config.schedule_family == "gpu" and config.precision != "fp32" else ""
    )


def _lower(config: PipelineConfig) -> list:
    if not config.lower_linear:
        return []
    if config.schedule_family != "cpu":
        gpu = _gpu_precision(config)
        return [LowerLinear(gpu_precision=gpu)] if gpu else []
    return [
        PatchEmbedToDense(),
        LowerLinear(config.int8_lanes, half=config.half, int8_kernels=config.int8_kernels),
        relax.transform.RemoveRedundantReshape(),
    ]


def _annotate(config: PipelineConfig) -> list:
    out = [] if config.plan is None else [AnnotatePruning(config.plan, config.graph)]
    if config.quantization is not None:
        out.append(AnnotateQuantization(config.quantization, config.graph))
    if config.half:
        out.append(AnnotateHalf(config.half_layers, config.graph, config.half))
    return out


def _legalize(_config: PipelineConfig) -> list:
    return [
        # Before legalization: it swaps Relax exp/softmax/erf for topi's fast forms.
        relax.transform.FastMathTransform(),
        relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.gelu": _legalize_gelu_fast}),
    ]


def _fuse(_config: PipelineConfig) -> list:
    return [
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        relax.transform.RewriteDataflowReshape(),
    ]


def _schedule(config: PipelineConfig) -> list:
    passes = []
    if config.precision != "fp32":
        paired.register_intrinsics()  # tuned records replay tensorize with them
    if config.database is not None:
        _tvm_intrin.load(config.target.kind.name)  # tuned records may tensorize with TVM's
        passes.append(_ApplyDatabase(config.database, config.target))
    rules = cpu_rules if config.schedule_family == "cpu" else gpu_rules
    return passes + [dlight.ApplyDefaultSchedule(*rules.default_rules())]


def phases(
    config: PipelineConfig, params: dict[str, np.ndarray] | None = None
) -> list[tuple[str, tvm.transform.Pass]]:
    """(name, pass) of every phase, in order; ``params`` are bound in the bind phase (None: the
    module's weights are bound already, or stay parameters)."""
    makers: dict[str, Callable[[PipelineConfig], list]] = {
        "structure": _structure,
        "annotate": _annotate,
        "bind": lambda c: [] if params is None else [BindWeights(params)],
        "sparsify": _sparsify,
        "lower": _lower,
        "legalize": _legalize,
        "fuse": _fuse,
        "schedule": _schedule,
    }
    return [(name, tvm.transform.Sequential(makers[name](config), name=name)) for name in PHASES]


def build_pipeline(
    config: PipelineConfig, params: dict[str, np.ndarray] | None = None
) -> tvm.transform.Pass:
    """The whole pipeline as one ``tvm.transform.Sequential`` of named phases."""
    return tvm.transform.Sequential([p for _, p in phases(config, params)], name=PIPELINE_NAME)


def vitsparse_pipeline(*, params: dict[str, np.ndarray] | None = None, **config):
    """The whole compile as TVM's pipeline registry builds them: keyword arguments of
    `PipelineConfig` (and ``params``) in, one pass out: vitsparse's phases, then TVM's default
    build passes (VM lowering), so that ``tvm.compile(mod, target, relax_pipeline="vitsparse")``
    compiles. Without ``target``, the pass uses the target it runs under."""

    @tvm.transform.module_pass(opt_level=0, name=PIPELINE_NAME)
    def run(mod: IRModule, _ctx) -> IRModule:
        target = config.get("target") or tvm.target.Target.current()
        if target is None:
            raise ValueError(
                "the vitsparse pipeline needs a target: pass target= or run it "
                "under `with target:` (tvm.compile does)"
            )
        phases_ = build_pipeline(PipelineConfig(**{**config, "target": target}), params)
        with target:
            return relax.get_pipeline("default")(phases_(mod))

    return run


if PIPELINE_NAME not in relax.pipeline.PIPELINE_MAP:
    relax.register_pipeline(PIPELINE_NAME)(vitsparse_pipeline)


@tvm.instrument.pass_instrument
class _DumpPhases:
    """Writes the module after each named phase to ``<dump_dir>/<phase>.py``."""

    def __init__(self, dump_dir: Path, names: tuple[str, ...]):
        self.dump_dir, self.names = Path(dump_dir), set(names)

    def run_after_pass(self, mod, info):
        if info.name in self.names:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{info.name}.py").write_text(mod.script(show_meta=False))


def optimize(
    mod: IRModule,
    config: PipelineConfig,
    params: dict[str, np.ndarray] | None = None,
    *,
    stop_before: str | None = None,
) -> IRModule:
    """Run the pipeline (every phase, or those before ``stop_before``) on ``mod``."""
    chosen = phases(config, params)
    if stop_before is not None:
        if stop_before not in PHASES:
            raise ValueError(f"unknown phase {stop_before!r}; phases are {', '.join(PHASES)}")
        chosen = chosen[: PHASES.index(stop_before)]
    sequential = tvm.transform.Sequential([p for _, p in chosen], name=PIPELINE_NAME)
    # The caller's context (its config and instruments) carries over; the dump joins it.
    outer = tvm.transform.PassContext.current()
    instruments = list(outer.instruments)
    if config.dump_dir is not None:
        instruments.append(_DumpPhases(config.dump_dir, PHASES))
    context = tvm.transform.PassContext(
        opt_level=outer.opt_level,
        required_pass=list(outer.required_pass),
        disabled_pass=list(outer.disabled_pass),
        instruments=instruments,
        config=dict(outer.config),
    )
    with config.target, context:
        return sequential(mod)


def compile_module(mod: IRModule, target: tvm.target.Target):
    """``tvm.compile`` of an optimized module (or a scheduled kernel) for ``target``: the Relax VM
    executable, or the kernel's library."""
    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target=target)


def build(mod: IRModule, config: PipelineConfig, params: dict[str, np.ndarray] | None = None):
    """`optimize` + `compile_module`."""
    return compile_module(optimize(mod, config, params), config.target)


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
