"""The Relax passes, one per module, and the pipeline that assembles them (`pipeline`). Importing
this package registers the pipeline beside TVM's own: ``relax.get_pipeline("vitsparse", ...)``,
or ``tvm.compile(mod, target, relax_pipeline="vitsparse")``."""

from vitsparse.passes import pipeline  # noqa: F401  (registers "vitsparse" with TVM)
