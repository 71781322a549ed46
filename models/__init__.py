"""The ML core: target loading and feature capture, drafts, losses, speculative decoding.

Nothing here imports Prefect, MLflow or Hydra: these modules take plain arguments.
"""
