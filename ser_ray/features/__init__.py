from ser_ray.features.config import FeatureConfig
from ser_ray.features.extractor import FeatureExtractor

__all__ = ["FeatureConfig", "FeatureExtractor"]
