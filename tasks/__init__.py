"""Prefect tasks: thin wrappers over llmlab functions (paths and configs in, small dicts out)."""
