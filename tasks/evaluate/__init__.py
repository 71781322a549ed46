"""Stage `evaluate`: stage.py runs speculative and plain decoding on the benchmarks and writes the
results; benchmarks.py reads the benchmark prompts."""
