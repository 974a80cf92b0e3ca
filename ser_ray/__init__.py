"""ser-ray: speech emotion recognition as a distributed batch system on Ray."""

__version__ = "0.1.0"
