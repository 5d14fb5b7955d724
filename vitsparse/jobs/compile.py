"""The compile job: import a ViT, run the pipeline for the plan and the target (tuned records
from the target's database, hand-written rules for the rest), ``tvm.compile`` it.

    compile_model(source, target=..., plan=..., db=...) -> CompiledModel (run, time, export)

The target, precision, database and plan are resolved once, before the import; `prepare` is
where an imported model meets its plan (checked against the PyTorch model, or an ONNX file's
weights) and, for int8, its calibration (`quantization_for`), and becomes a pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitsparse._tvm import tvm
from vitsparse.data.sources import load_images
from vitsparse.errors import ModelError
from vitsparse.frontend import RANDOM_WEIGHTS_SEED, ImportedModel, import_model
from vitsparse.jobs._break_even import break_even_for
from vitsparse.jobs._inputs import Inputs, resolve_inputs
from vitsparse.jobs.artifact import CompiledModel
from vitsparse.passes import pipeline
from vitsparse.plan import PruningPlan, apply_plan_to_torch, validate_plan
from vitsparse.plan.quantize import Quantization, quantized_layers
from vitsparse.pruning.calibrate import calibrate
from vitsparse.pruning.onnx_masks import validate_onnx_plan
from vitsparse.targets import TargetSpec, int8_kernels, int8_lanes


def compile_model(
    source,
    *,
    target: str | dict | TargetSpec = "x86",
    batch: int = 1,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    weights_seed: int = RANDOM_WEIGHTS_SEED,
    cuda_arch: str | None = None,
    db: str | Path | None = None,
    plan: PruningPlan | str | Path | None = None,
    dump_dir: str | Path | None = None,
    precision: str = "fp32",
    calib: str | Path | None = None,
    calib_size: int = 64,
) -> CompiledModel:
    """Import ``source`` (timm name, nn.Module or .onnx path) and compile it for ``target``.

    ``db`` is a tuning-database root (``vitsparse tune`` writes it); the target's records are
    used where they exist, the hand-written schedules everywhere else. ``plan`` (a PruningPlan or
    its JSON file) compiles the pruned model: block-masked layers become BSR kernels where their
    density is below the measured break-even, masked dense kernels elsewhere. ``dump_dir``
    receives the module after every phase of the pipeline. ``precision`` ``"int8"`` quantizes
    the blocks' linear layers (`vitsparse.plan.quantize`), their activation scales calibrated
    on ``calib_size`` images of ``calib`` (`vitsparse.data.sources`), after the plan;
    ``"bf16"`` and ``"fp16"`` compute the same layers in that half precision (fp32 sums).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    # Bad targets, precisions, databases and plan files fail before the (slow) import.
    inputs = resolve_inputs(
        target=target,
        cuda_arch=cuda_arch,
        db=db,
        plan=plan,
        precision=precision,
        calib=calib,
        calib_size=calib_size,
    )
    imported = import_model(
        source, batch=batch, checkpoint=checkpoint, pretrained=pretrained, seed=weights_seed
    )
    return compile_resolved(imported, inputs, dump_dir=dump_dir)


def compile_imported(
    imported: ImportedModel,
    *,
    target: str | dict | TargetSpec = "x86",
    cuda_arch: str | None = None,
    db: str | Path | None = None,
    plan: PruningPlan | str | Path | None = None,
    dump_dir: str | Path | None = None,
    precision: str = "fp32",
    calib: str | Path | None = None,
    calib_size: int = 64,
) -> CompiledModel:
    """Compile an already-imported model (see compile_model)."""
    inputs = resolve_inputs(
        target=target,
        cuda_arch=cuda_arch,
        db=db,
        plan=plan,
        precision=precision,
        calib=calib,
        calib_size=calib_size,
    )
    return compile_resolved(imported, inputs, dump_dir=dump_dir)


def compile_resolved(
    imported: ImportedModel,
    inputs: Inputs,
    *,
    dump_dir: str | Path | None = None,
    quantization: Quantization | None = None,
) -> CompiledModel:
    """Compile ``imported`` with inputs a job resolved already (`resolve_inputs`); int8 with
    ``quantization`` when given, else calibrated on the inputs' images."""
    if quantization is None:
        quantization = quantization_for(imported, inputs)
    mod, config, params = prepare(
        imported,
        inputs.spec,
        inputs.plan,
        database=inputs.database,
        dump_dir=dump_dir,
        quantization=quantization,
        precision=inputs.precision,
    )
    optimized = pipeline.optimize(mod, config, params)
    executable = pipeline.compile_module(optimized, inputs.spec.target)
    tuned = pipeline.count_tuned(optimized)
    return CompiledModel(
        executable,
        inputs.spec,
        imported,
        tuned,
        inputs.plan,
        config.decisions,
        quantization,
        precision=config.precision,
        reduced_layers=config.half_layers,
    )


def graph_on_host(imported: ImportedModel, inputs: Inputs, quantization: Quantization | None):
    """What ``inputs``' target compiles ``imported`` to, stopped before the target's schedules
    (the structure, the reduced-precision layers and the BSR kernels, unscheduled) and built for
    this CPU: the computation a GPU compile's kernels carry out, checkable where no GPU is.
    Returns (Relax VM executable, the pipeline config, its decisions filled)."""
    mod, config, params = prepare(
        imported,
        inputs.spec,
        inputs.plan,
        quantization=quantization,
        precision=inputs.precision,
    )
    relaxed = pipeline.optimize(mod, config, params, stop_before="legalize")
    return pipeline.compile_module(relaxed, tvm.target.Target("llvm")), config


def quantization_for(imported: ImportedModel, inputs: Inputs) -> Quantization | None:
    """int8's activation scales for ``imported`` pruned by the inputs' plan (None in fp32),
    calibrated on the inputs' images."""
    if inputs.precision != "int8":
        return None
    model = _reduced_model(imported, inputs.precision, inputs.plan)
    size = imported.input_shape[-1]
    images = load_images(inputs.calib, image_size=size, limit=inputs.calib_size).images
    return calibrate(model, images, describe={"source": str(inputs.calib)})


def _reduced_model(imported: ImportedModel, precision: str, plan: PruningPlan | None):
    """The PyTorch model a reduced precision is computed from (the plan applied)."""
    if imported.torch_model is None:
        raise ModelError(
            f"{precision} needs the PyTorch model (its layers and reference); {imported.model_id} "
            "is an ONNX import, which compiles in fp32"
        )
    model = imported.torch_model
    return model if plan is None else apply_plan_to_torch(model, plan)


def prepare(
    imported: ImportedModel,
    spec: TargetSpec,
    plan: PruningPlan | None = None,
    *,
    database=None,
    dump_dir: str | Path | None = None,
    quantization: Quantization | None = None,
    precision: str | None = None,
) -> tuple[object, pipeline.PipelineConfig, dict[str, np.ndarray]]:
    """The module, pipeline config and weights that compile (or tune) ``imported`` for ``spec``,
    pruned by ``plan`` when given (checked against the PyTorch model first), in ``precision``
    (None: int8 with ``quantization``, else fp32). The config's ``decisions`` fill with
    BlockSparsify's per-layer choices while the pipeline runs."""
    if precision is None:
        precision = "fp32" if quantization is None else "int8"
    if plan is not None:
        if imported.torch_model is not None:
            validate_plan(plan, imported.torch_model)
        else:  # an ONNX import: block masks of its layers, for its weights
            validate_onnx_plan(plan, imported)
    half_layers: tuple[str, ...] = ()
    if precision in ("bf16", "fp16"):  # after validation: a bad plan is named as such
        half_layers = tuple(quantized_layers(_reduced_model(imported, precision, plan)))
    config = pipeline.PipelineConfig(
        target=spec.target,
        schedule_family=spec.schedule_family,
        database=database,
        plan=plan,
        graph=imported.graph if plan is not None or precision != "fp32" else None,
        break_even=break_even_for(spec, precision) if plan is not None else None,
        dump_dir=Path(dump_dir) if dump_dir is not None else None,
        quantization=quantization,
        int8_lanes=int8_lanes(spec) if quantization is not None else 0,
        int8_kernels=int8_kernels(spec) if quantization is not None else "int8",
        precision=precision,
        half_layers=half_layers,
    )
    return imported.mod, config, imported.params
