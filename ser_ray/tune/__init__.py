"""Hyperparameter search: per-family spaces (space.py), Tuner construction and outputs (search.py)."""
