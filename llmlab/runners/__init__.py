"""Stage runners, one module per stage kind: `run_<kind>(ctx) -> (outputs, metrics)`.

`llmlab.execute.execute_stage` calls them (looked up by kind in `llmlab.runners.registry`); they read
the stage's config from `ctx.config` (`llmlab.runners.context.StageContext`), write outputs
atomically under `ctx.out_dir` and log through `ctx.log` / `ctx.run`.
"""
