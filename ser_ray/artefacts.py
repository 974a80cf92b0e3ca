"""What one stage leaves for the next: the experiment directory's layout and its schema version.

A search (``ser-ray tune``) writes an experiment; ``ser-ray ensemble --from``, ``ser-ray run``, the demo
and the report read it through ``Experiment`` only, so a name or a format changes in one place. The
schema version is written into ``best.json``; a reader refuses an experiment from a newer ser-ray
instead of misreading it. (Bundles carry their own version in ``bundle.json``, annotation outputs
their layout in ``annotate/writer.py``.)
"""

from __future__ import annotations

import json

from ser_ray import storage

EXPERIMENT_SCHEMA = 1  # best.json["_search"]["schema_version"]


class Experiment:
    """A tune experiment directory (local or ``s3://``)::

        best.json        per family: best trial on validation, its val/test metrics, model dir, manifest
        split.parquet    the manifest rows the search used (label-mapped) with `split` train/val/test
        trials.parquet   every trial (and trials.csv, the same table)
        best/<family>/model/   the selected models
        bundle/          the ensemble `ser-ray run` builds from them
        annotations/     `ser-ray run`'s annotation output
    """

    def __init__(self, root: str):
        self.root = str(root)

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    @property
    def best_json(self) -> str:
        return self.path("best.json")

    @property
    def split(self) -> str:
        return self.path("split.parquet")

    @property
    def trials(self) -> str:
        return self.path("trials.parquet")

    @property
    def trials_csv(self) -> str:
        return self.path("trials.csv")

    @property
    def bundle(self) -> str:
        return self.path("bundle")

    @property
    def annotations(self) -> str:
        return self.path("annotations")

    def model_dir(self, family: str) -> str:
        return storage.join(self.root, "best", family, "model")

    def searched(self) -> bool:
        """The search finished: its best models and its split are written."""
        return storage.exists(self.best_json) and storage.exists(self.split)

    def read_best(self) -> dict:
        """``best.json``, refused when a newer ser-ray wrote it."""
        best = json.loads(storage.read_bytes(self.best_json))
        version = (best.get("_search") or {}).get("schema_version", 0)
        if version > EXPERIMENT_SCHEMA:
            raise ValueError(f"{self.best_json}: experiment schema {version} is newer than this ser-ray reads "
                             f"({EXPERIMENT_SCHEMA}); upgrade ser-ray")
        return best

    def write_best(self, best: dict, summary: dict) -> None:
        blob = json.dumps({**best, "_search": {**summary, "schema_version": EXPERIMENT_SCHEMA}}, indent=1,
                          default=_json_default).encode()
        storage.write_bytes(self.best_json, blob)


def _json_default(value):
    # numpy scalars from the trials table; anything else as its text (paths, timestamps)
    return value.item() if hasattr(value, "item") else str(value)
