"""Feature configuration and the one extractor (imported on first use: the extractor loads torch)."""

from ser_ray.features.config import FeatureConfig

__all__ = ["FeatureConfig", "FeatureExtractor"]


def __getattr__(name: str):
    # `ser-ray prepare` on one machine hands extraction to worker processes; its own process never
    # needs torch (~1 s to import), so the extractor is imported only when asked for.
    if name == "FeatureExtractor":
        from ser_ray.features.extractor import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
