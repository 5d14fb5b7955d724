"""The jobs: each resolves its inputs once (model source, target, database, plan, device) and
orchestrates the ingredient floors below it. One module per job: compile, tune, bench, profile,
eval, prune (`artifact` holds what compile returns)."""
