"""Hydra configuration groups, shipped with the package so `deepspec` works from any directory."""
