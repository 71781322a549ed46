"""Draft architectures, one per file."""
