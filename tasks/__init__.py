"""Pipeline stages as plain functions, each with a thin Prefect task wrapper."""
