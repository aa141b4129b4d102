"""Dagster orchestration of the unirl pipeline (thin: each asset calls one `unirl` function)."""
