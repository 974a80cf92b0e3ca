"""What one stage leaves for the next: the experiment directory's layout and its schema version.

A search (``ser-ray tune``) writes an experiment; ``ser-ray ensemble --from``, ``ser-ray run``, the demo
and the report read it through ``Experiment`` only, so a name or a format changes in one place. The
schema version is written into ``best.json``; a reader refuses an experiment from a newer ser-ray
instead of misreading it. ``CvResult`` does the same for ``ser-ray cv`` / ``compare`` / cross-corpus
result directories (version in ``summary.json``), and ``ANNOTATION_*`` names the parts of an
annotation output (written by ``annotate/writer.py``). Bundles carry their own version in
``bundle.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ser_ray import storage

EXPERIMENT_SCHEMA = 1  # best.json["_search"]["schema_version"]
CV_SCHEMA = 1  # summary.json["schema_version"] of a cv result

# an annotation output: files/ commits a batch, segments/ holds its windows (see annotate/writer.py)
ANNOTATION_FILES, ANNOTATION_SEGMENTS = "files", "segments"
ANNOTATION_PAGE = "archive.html"  # the archive page `ser-ray annotate` writes beside them
ANNOTATION_ATTEMPTS = "_attempts"  # offline runs' per-file attempt journal (removed when a run ends)


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


class CvResult:
    """A local ``ser-ray cv`` result directory (``compare`` holds one per family, plus ``ensemble/``)::

        folds.json                       speakers of every fold, written before any training
        fold_<i>/metrics.json            written last: its presence marks the fold as done
        fold_<i>/predictions.parquet     test speakers
        fold_<i>/val_predictions.parquet validation speakers, from models that never trained on them
        fold_<i>/oof_predictions.parquet classical families: every training speaker out of fold
        fold_<i>/history.json, learning_curves.png, model/
        confusion.png, summary.json      over the folds run (summary carries CV_SCHEMA)
    """

    def __init__(self, root):
        self.root = Path(root)

    @property
    def folds_json(self):
        return self.root / "folds.json"

    @property
    def summary_json(self):
        return self.root / "summary.json"

    @property
    def confusion_png(self):
        return self.root / "confusion.png"

    def fold_dir(self, fold: int):
        return self.root / f"fold_{fold}"

    def fold_file(self, fold: int, name: str):
        """``name`` is one of metrics.json, predictions.parquet, val_predictions.parquet,
        oof_predictions.parquet, history.json, learning_curves.png, model."""
        return self.fold_dir(fold) / name

    def fold_done(self, fold: int) -> bool:
        return self.fold_file(fold, "metrics.json").exists()

    def folds_with(self, name: str) -> set[int]:
        """Folds whose directory holds ``name``."""
        return {int(p.parent.name.split("_")[1]) for p in self.root.glob(f"fold_*/{name}")}

    def write_summary(self, summary: dict) -> None:
        self.summary_json.write_text(json.dumps({**summary, "schema_version": CV_SCHEMA}, indent=1))

    def read_summary(self) -> dict:
        summary = json.loads(self.summary_json.read_text())
        if summary.get("schema_version", 0) > CV_SCHEMA:
            raise ValueError(f"{self.summary_json}: cv result schema {summary['schema_version']} is newer than this "
                             f"ser-ray reads ({CV_SCHEMA}); upgrade ser-ray")
        return summary


def _json_default(value):
    # numpy scalars from the trials table; anything else as its text (paths, timestamps)
    return value.item() if hasattr(value, "item") else str(value)
