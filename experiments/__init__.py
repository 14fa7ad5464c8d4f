"""Ablation experiments: one script per idea, each writing CSV, PNG and markdown results.

Run them from the repository root as ``python -m experiments.<name>`` (see experiments/README.md).
"""
