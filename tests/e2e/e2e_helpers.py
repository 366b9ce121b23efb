"""Helpers for whole-pipeline tests."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def shrunk_tiny(tmp_path: Path, name: str = "tiny-test", pipeline: str = "tiny.yaml", **stage_updates) -> Path:
    """pipelines/tiny.yaml (or another shipped pipeline) with the same stages and data, a small
    model and a few steps."""
    raw = yaml.safe_load((ROOT / "pipelines" / pipeline).read_text())
    raw["name"] = name
    raw["workdir"] = str(tmp_path / "runs")
    raw["tokenizer"]["train"].update(vocab_size=512, max_documents=1500)
    raw["model"].update(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_layers=2, max_seq_len=32)
    raw["stages"]["pretrain"]["train"].update(max_steps=12, warmup_steps=2, batch_sequences=4, eval_every=6, eval_steps=4,
                                              save_every=6, log_every=3)
    if "sft" in raw["stages"]:
        raw["stages"]["sft"]["train"].update(max_steps=6, warmup_steps=1, batch_sequences=4, eval_every=3, eval_steps=2,
                                             save_every=3, log_every=3)
        raw["stages"]["sft"]["max_examples"] = 200
    if "dpo" in raw["stages"]:
        raw["stages"]["dpo"]["train"].update(max_steps=4, warmup_steps=1, batch_pairs=4, gradient_accumulation_steps=2, eval_every=2,
                                             eval_steps=2, save_every=2, log_every=2)
        raw["stages"]["dpo"]["max_examples"] = 64
    if "reward" in raw["stages"]:
        raw["stages"]["reward"]["train"].update(max_steps=4, warmup_steps=1, batch_pairs=4, gradient_accumulation_steps=2, eval_every=2,
                                                eval_steps=2, save_every=2, log_every=2)
        raw["stages"]["reward"]["max_examples"] = 64
    for rl in ("grpo", "ppo"):
        if rl in raw["stages"]:
            group = raw["stages"][rl].get("group_size", 1)  # 16 completions per rollout, 8 per step
            raw["stages"][rl]["train"].update(max_steps=2, warmup_steps=0, rollout_prompts=16 // group,
                                              batch_prompts=8 // group, eval_every=2, save_every=2, log_every=1)
            raw["stages"][rl].update(max_new_tokens=6, eval_prompts=8, max_prompts=64)
    raw["stages"]["eval"].update(batch_sequences=4, batches=4, max_new_tokens=8, tasks_limit=8, preferences_limit=8)
    for stage, changes in stage_updates.items():
        raw["stages"][stage].update(changes)
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec
