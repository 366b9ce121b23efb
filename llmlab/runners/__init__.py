"""Stage runners, one module per stage kind: `run_<kind>(ctx) -> (outputs, metrics)`.

`llmlab.stages.execute_stage` calls them (looked up by kind in `stages.RUNNERS`); they read the
stage's config from `ctx.config`, write outputs atomically under `ctx.out_dir` and log through
`ctx.log` / `ctx.run`.
"""
