"""Training: the Ray Train worker loop (``loop``), its config (``config``), metrics, evaluation and
speaker-independent cross-validation (``cv``)."""
