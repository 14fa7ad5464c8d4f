"""The papers' claims as experiments: each a training config plus variants, seeds and hypotheses.

Run them from the repository root as ``python -m experiments.run NAME`` (see experiments/README.md).
"""
