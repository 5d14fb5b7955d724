"""vitsparse: compile pruned Vision Transformers with Apache TVM.

The public API (imported lazily: `import vitsparse` stays cheap):
    import_model  -- load a ViT (timm name, nn.Module, checkpoint, ONNX) into Relax + ViTGraph
    compile_model -- import and compile for a target; returns a CompiledModel (run/time/export)
    tune          -- MetaSchedule tuning job into a per-target database (resumable)
    bench         -- compiled model vs PyTorch eager vs ONNX Runtime
    finetune      -- recover a pruned model's accuracy by distillation; a checkpoint and the
                     plan re-issued for it
    search        -- prune to a latency/energy budget measured on the target, re-planning from
                     what it measured; the front, the chosen plan and its artifact
    prune         -- a PruningPlan: explicit fractions (magnitude or random), or a criterion
                     (magnitude, lpvit, nvit, upvit, cpvit, combined) under a budget;
                     apply_plan_to_torch gives the PyTorch reference of a plan
    flops         -- MACs/FLOPs of a (pruned) model, analytic or read off a Relax module
    params        -- weights of a (pruned) model
"""

from vitsparse._lazy import lazy_api
from vitsparse._versions import VERSION as __version__

_API = {
    "import_model": "vitsparse.frontend.importer",
    "compile_model": "vitsparse.jobs.compile",
    "CompiledModel": "vitsparse.jobs.artifact",
    "tune": "vitsparse.jobs.tune",
    "bench": "vitsparse.jobs.bench",
    "resolve_target": "vitsparse.targets.presets",
    "prune": "vitsparse.jobs.prune",
    "finetune": "vitsparse.jobs.finetune",
    "search": "vitsparse.jobs.search",
    "PruningPlan": "vitsparse.plan.format",
    "apply_plan_to_torch": "vitsparse.plan.reference",
    "flops": "vitsparse.jobs.flops",
    "params": "vitsparse.jobs.flops",
}

__all__ = ["__version__", *_API]
__getattr__, __dir__ = lazy_api(__name__, _API, eager=("__version__",))
