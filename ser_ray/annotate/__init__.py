"""Annotating audio archives: windows, VAD, the per-file function, resumable writers, Ray Data."""

from ser_ray.annotate.core import AnnotateConfig, annotate_file

__all__ = ["AnnotateConfig", "annotate_file"]
