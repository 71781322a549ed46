"""Stage `evaluate`: stage.py runs speculative and plain decoding on the benchmarks and writes the
results; benchmarks.py reads and selects the benchmark prompts; sources.py builds the benchmark files
from their public datasets."""
