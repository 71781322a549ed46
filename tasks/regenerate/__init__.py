"""Stage `regenerate`: the target answers the prompts. stage.py (plan, answer a shard, finalize; the
Prefect tasks), backends.py (in-process transformers, and OpenAI-compatible HTTP servers)."""
