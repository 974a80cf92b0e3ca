"""run the whole flow on your corpus: search, ensemble bundle, then label an archive

``ser-ray run --config FILE [--root DIR] [--out DIR]`` (or ``ray job submit -- python jobs/pipeline.py
...``): one resumable flow from a corpus to a bundle that ``ser-ray serve`` takes as it is::

    tune      manifest, speaker-disjoint split, feature caches, trials -> <experiment>/best.json, split.parquet
    ensemble  the best model of each family, fitted on the search's validation speakers -> <experiment>/bundle
    annotate  (when the config has `annotate: {input: ...}`) every file of an archive -> <experiment>/annotations

The config is a tune config (``configs/tune-*.yaml``) plus an optional ``annotate`` section
(``input``, and optionally ``output``, ``window_s``, ``hop_s``, ``vad``, ``max_duration_s``). A rerun
skips finished stages and says so: a search with ``best.json`` is done (an interrupted one resumes,
keeping finished trials), a bundle newer than its ``best.json`` is done, and annotation skips the
files its output already holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from ser_ray import storage

log = logging.getLogger(__name__)

ANNOTATE_KEYS = ("input", "output", "window_s", "hop_s", "vad", "max_duration_s")


@dataclasses.dataclass
class PipelineConfig:
    search: object  # SearchConfig
    annotate: dict | None = None

    @property
    def experiment(self):  # ser_ray.artefacts.Experiment
        from ser_ray.artefacts import Experiment

        return Experiment(self.search.experiment_path)


def load_pipeline_config(path: str, overrides: list[str] | None = None, **options) -> PipelineConfig:
    """A tune config plus an optional ``annotate`` section; ``overrides`` (``--set``) and ``options`` as
    for ``load_search_config``."""
    from ser_ray.config import apply_overrides, read_yaml_mapping
    from ser_ray.tune.config import search_config_from_mapping

    data = apply_overrides(read_yaml_mapping(path, "pipeline config (a tune config + `annotate:`)"), overrides)
    annotate = data.pop("annotate", None)
    if annotate is not None:
        if not isinstance(annotate, dict) or not annotate.get("input"):
            raise ValueError(f"{path}: `annotate` needs at least `input: DIR` (a directory or s3:// prefix)")
        unknown = sorted(set(annotate) - set(ANNOTATE_KEYS))
        if unknown:
            raise ValueError(f"{path}: annotate: unknown key(s) {unknown}; valid: {list(ANNOTATE_KEYS)}")
    return PipelineConfig(search=search_config_from_mapping(data, str(path), **options), annotate=annotate)


class _Stage:
    """Prints ``[n/N] name ...`` then ``done in S s`` or ``skipped: why``: one line each, nothing else."""

    def __init__(self, total: int):
        self.total, self.n = total, 0

    def start(self, name: str) -> float:
        self.n += 1
        print(f"[{self.n}/{self.total}] {name}", flush=True)
        return time.perf_counter()

    @staticmethod
    def done(start: float, what: str) -> None:
        print(f"      done in {time.perf_counter() - start:.0f} s: {what}", flush=True)

    @staticmethod
    def skipped(why: str) -> None:
        print(f"      skipped: {why}", flush=True)


def _modified(uri: str) -> float:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem_and_path(uri)
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.type != pafs.FileType.NotFound and info.mtime else 0.0


def run_pipeline(config: PipelineConfig) -> dict:
    """Run (or resume) the stages; returns where each artefact is and the headline numbers."""
    import json

    from ser_ray.ensemble.commands import build_bundle
    from ser_ray.tune.search import run_search

    stages = _Stage(3 if config.annotate else 2)
    experiment = config.experiment
    bundle, best_json = experiment.bundle, experiment.best_json
    result = {"experiment": experiment.root, "bundle": bundle}

    start = stages.start(f"search: {config.search.num_samples} trials over {', '.join(config.search.families)} "
                         f"-> {experiment.root}")
    if experiment.searched():
        stages.skipped("best.json and split.parquet exist (delete the experiment to search again)")
    else:
        search = run_search(config.search, resume=True)
        stages.done(start, ", ".join(f"{family} val UA {b['val']['ua']:.3f}" for family, b in search.best.items()))

    start = stages.start(f"ensemble bundle -> {bundle}")
    bundle_json = storage.join(bundle, "bundle.json")
    if storage.exists(bundle_json) and _modified(bundle_json) >= _modified(best_json):
        stages.skipped("the bundle is newer than best.json")
        report = json.loads(storage.read_bytes(storage.join(bundle, "ensemble_metrics.json")))
    else:
        report = build_bundle([experiment.root], bundle)
        test = (report.get("test") or {}).get("ensemble", {})
        stages.done(start, f"weights {report['validation']['weights']}; test speakers: UA {test.get('ua', float('nan')):.3f}")
    result["ensemble_test"] = (report.get("test") or {}).get("ensemble")

    if config.annotate:
        from ser_ray.annotate.commands import write_page
        from ser_ray.annotate.core import AnnotateConfig
        from ser_ray.annotate.offline import annotate_archive

        section = dict(config.annotate)
        source = section.pop("input")
        output = section.pop("output", None) or experiment.annotations
        start = stages.start(f"annotate {source} -> {output}")
        summary = annotate_archive(source, output, bundle, AnnotateConfig(**section), progress=True)
        page = write_page(output)
        stages.done(start, f"{summary['n_processed']} files labelled ({summary['n_error']} errors), "
                           f"{summary['n_skipped']} already done" + (f"; archive page {page}" if page else ""))
        result.update(annotations=output, annotate=summary, archive_page=page)
    return result


def add_arguments(parser: argparse.ArgumentParser, command_name: str = "run") -> None:
    parser.add_argument("--config", required=True, help="a tune config (configs/tune-*.yaml), optionally with "
                                                        "an `annotate: {input: DIR}` section")
    parser.add_argument("--root", help="corpus directory or s3:// prefix (overrides data.root)")
    parser.add_argument("--out", help="storage path for the experiment (overrides storage_path)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set num_samples=4 --set train.batch_size=16")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, the job's cluster, else a local Ray)")


def config_from_args(args) -> PipelineConfig:
    return load_pipeline_config(args.config, args.overrides, storage_path=args.out, **{"data.root": args.root})


def run(args) -> int:
    from ser_ray.session import connect

    config = config_from_args(args)
    connect(args.address)
    result = run_pipeline(config)
    print(f"bundle {result['bundle']} (serve it: ser-ray serve --bundle {result['bundle']})")
    return 0
