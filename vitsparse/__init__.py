"""vitsparse: compile pruned Vision Transformers with Apache TVM.

The public API (imported lazily: `import vitsparse` stays cheap):
    import_model  -- load a ViT (timm name, nn.Module, checkpoint, ONNX) into Relax + ViTGraph
    compile_model -- import and compile for a target; returns a CompiledModel (run/time/export)
    tune          -- MetaSchedule tuning job into a per-target database (resumable)
    bench         -- compiled model vs PyTorch eager vs ONNX Runtime
    prune         -- a PruningPlan: explicit fractions (magnitude or random), or a criterion
                     (magnitude, lpvit, nvit, upvit, cpvit) under a budget;
                     apply_plan_to_torch gives the PyTorch reference of a plan
    flops         -- MACs/FLOPs of a (pruned) model, analytic or read off a Relax module
    params        -- weights of a (pruned) model
"""

__version__ = "0.1.0"

_API = {
    "import_model": ("vitsparse.frontend", "import_model"),
    "compile_model": ("vitsparse.compiler", "compile_model"),
    "CompiledModel": ("vitsparse.compiler", "CompiledModel"),
    "tune": ("vitsparse.schedules.tuning", "tune"),
    "bench": ("vitsparse.report.compare", "bench"),
    "resolve_target": ("vitsparse.targets", "resolve_target"),
    "prune": ("vitsparse.pruning", "prune"),
    "PruningPlan": ("vitsparse.plan", "PruningPlan"),
    "apply_plan_to_torch": ("vitsparse.plan", "apply_plan_to_torch"),
    "flops": ("vitsparse.flop_count", "flops"),
    "params": ("vitsparse.flop_count", "params"),
}

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'vitsparse' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)
