"""Ray Serve: the ensemble bundle behind an HTTP API (see app.py)."""
