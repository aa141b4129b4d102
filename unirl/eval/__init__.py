"""Evaluation: benchmarks, reports and sample grids."""
