"""``ser-ray ensemble``: calibrate and weight the best model of each family into a bundle."""

from __future__ import annotations

import json
import logging

from ser_ray import storage

log = logging.getLogger(__name__)


def add_arguments(parser, command_name: str = "ensemble") -> None:
    parser.add_argument(
        "--from", dest="sources", nargs="+", required=True,
        help="a tune experiment directory (its best.json and split.parquet are all it needs), or one or more "
             "model/checkpoint directories (then pass --manifest)",
    )
    parser.add_argument("--out", required=True, help="bundle directory or s3:// prefix to write")
    parser.add_argument("--manifest", help="manifest with a `split` column (val rows fit, test rows evaluate); "
                                           "default: the experiment's split.parquet")
    parser.add_argument("--device", default="cpu")


def model_dirs_from(sources: list[str]) -> tuple[list[str], dict]:
    """Model directories, and best.json's content when ``sources`` is one experiment directory."""
    from ser_ray.artefacts import Experiment

    experiment = Experiment(sources[0])
    if len(sources) == 1 and storage.exists(experiment.best_json):
        best = experiment.read_best()
        dirs = [entry["checkpoint_path"] for _, entry in sorted(best.items()) if isinstance(entry, dict) and "checkpoint_path" in entry]
        if not dirs:
            raise ValueError(f"{sources[0]}/best.json names no checkpoint_path")
        return dirs, best
    return list(sources), {}


def build_bundle(sources: list[str], out: str, manifest_path: str | None = None, device: str = "cpu") -> dict:
    """Fit the ensemble of ``sources`` (an experiment, or model directories with ``manifest_path``) on
    the validation rows, evaluate it on the test rows, save the bundle to ``out``; returns the report."""
    from ser_ray.corpora.manifest import read_manifest
    from ser_ray.ensemble.bundle import save_bundle
    from ser_ray.ensemble.fit import fit_bundle_from_dirs
    from ser_ray.train.data import Split

    dirs, best = model_dirs_from(sources)
    manifest_path = manifest_path or next((e.get("manifest") for e in best.values() if isinstance(e, dict) and e.get("manifest")), None)
    if not manifest_path:
        raise SystemExit("ser-ray ensemble: pass --manifest FILE (a manifest with a `split` column); experiments "
                         "searched before split.parquet existed do not record their split")
    if not storage.exists(manifest_path):
        raise FileNotFoundError(f"manifest {manifest_path} does not exist")
    manifest = read_manifest(manifest_path)
    if "split" not in manifest:
        raise SystemExit(f"{manifest_path}: no `split` column; run `ser-ray splits` first")
    split = Split.from_manifest(manifest)
    _, val, test = split
    shared = split.speakers()["overlap"]
    if shared:  # weights fitted or scores measured on speakers the models (or weights) saw
        raise ValueError(f"{manifest_path}: speakers {sorted(shared)[:5]} are on two sides of the split; the ensemble "
                         "needs speaker-disjoint train/val/test (ser-ray splits writes such a column)")
    summary = {
        "manifest": str(manifest_path),
        "corpora": sorted(manifest["corpus"].unique().tolist()),
        "n_val": int(len(val)),
        "n_test": int(len(test)),
        "sources": dirs,
    }
    searched = (best.get("_search") or {}).get("split") or {}
    if searched:  # how the search split its speakers: shown beside every score of this bundle
        summary.update(split=f"{searched.get('protocol')} fold {searched.get('test_fold')}",
                       leaky=bool(searched.get("leaky")))
    bundle, report = fit_bundle_from_dirs(dirs, val, test, device=device, data_summary=summary)
    save_bundle(bundle, out)
    storage.write_bytes(storage.join(out, "ensemble_metrics.json"), json.dumps(report, indent=2).encode())
    if "test" in report:  # the ensemble's errors on the held-out speakers, as people would rather look at them
        from ser_ray.report.plots import plot_confusion

        plot_confusion(report["test"]["ensemble"]["confusion"], bundle.labels,
                       storage.join(out, "ensemble_test_confusion.png"),
                       title="ensemble on the test speakers (row-normalised)")
    return report


def run(args) -> int:
    report = build_bundle(args.sources, args.out, args.manifest, args.device)
    for split in ("validation", "test"):
        if split in report:
            part = report[split]
            for name, m in part["members"].items():
                m = m.get("calibrated", m)
                log.info("%-10s %-12s UA %.3f WA %.3f F1 %.3f ECE %.3f", split, name, m["ua"], m["wa"], m["macro_f1"], m["ece"])
            e = part["ensemble"]
            log.info("%-10s %-12s UA %.3f WA %.3f F1 %.3f ECE %.3f", split, "ENSEMBLE", e["ua"], e["wa"], e["macro_f1"], e["ece"])
    log.info("weights %s -> %s", report["validation"]["weights"], args.out)
    return 0
