"""Stage `cache`: the target's features of every answer, stored for training.

stage.py (plan, build a shard, finalize; the Prefect tasks), answers.py (answers read and rendered
one way, for the cache and online training), format.py (Arrow shards and manifest on any fsspec URL),
encoding.py (feature encodings), loader.py (training's sample streams), estimate.py (`deepspec
estimate-cache`)."""
