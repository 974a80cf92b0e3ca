"""Ensembles of the best model per family: fitting weights and temperatures, and the bundle."""

from ser_ray.ensemble.bundle import Bundle, Member, load_bundle, save_bundle

__all__ = ["Bundle", "Member", "load_bundle", "save_bundle"]
