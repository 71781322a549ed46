"""Stage `train`: stage.py decides and launches (done-checks, fingerprints, torchrun, the Prefect task);
recipe.py is what every rank runs (setup, train, save, cleanup); schedule.py the batch and learning-rate
arithmetic; metrics.py the figures logged between optimizer steps."""
