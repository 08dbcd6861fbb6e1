"""
EMMA's efficiency claims as ratios measured side by side in one run: `python -m benchmarks` (see `--help`).

Each row times its candidates interleaved (A, B, A, B, ...) and reports medians, so the machine's drift hits both
sides alike; absolute times are only reported from a GPU, with the device named.
"""
