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
import contextlib
import dataclasses
import json
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


class Stages:
    """Prints ``[n/N] name``, then ``done in S s: what`` or ``skipped: why`` (one line each) and keeps
    each stage's wall time; ``with stages("name") as stage: stage.summary = ...`` / ``stage.skip(why)``."""

    def __init__(self, total: int):
        self.total, self.index, self.times = total, 0, {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.index += 1
        print(f"[{self.index}/{self.total}] {name}", flush=True)
        stage, t0 = _Stage(), time.perf_counter()
        yield stage
        self.times[name] = round(time.perf_counter() - t0, 1)
        if stage.skipped:
            print(f"      skipped: {stage.skipped}", flush=True)
        else:
            print(f"      done in {self.times[name]:.0f} s" + (f": {stage.summary}" if stage.summary else ""),
                  flush=True)


class _Stage:
    def __init__(self):
        self.summary, self.skipped = "", ""

    def skip(self, why: str) -> None:
        self.skipped = why


def _modified(uri: str) -> float:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem_and_path(uri)
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.type != pafs.FileType.NotFound and info.mtime else 0.0


# settings that place trials but do not change what a search finds
PLACEMENT_KEYS = ("max_concurrent_trials", "resources", "gpu", "storage_path", "trial_retries")


def config_changes(saved: dict | None, search) -> list[str]:
    """The settings (dotted keys) in which ``search`` differs from the config a finished search saved
    in its best.json; empty when they agree or the experiment predates saved configs."""
    if not saved:
        return []
    now = json.loads(json.dumps(search.to_dict(), default=str))

    def flat(value, prefix=""):
        if isinstance(value, dict):
            return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    old, new = flat({k: v for k, v in saved.items() if k not in PLACEMENT_KEYS}), \
        flat({k: v for k, v in now.items() if k not in PLACEMENT_KEYS})
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def run_pipeline(config: PipelineConfig, stages: Stages | None = None, *, on_change: str = "refuse",
                 report: bool = True) -> dict:
    """Run (or resume) the stages; returns where each artefact is and the headline numbers.

    ``report``: finish with ``<experiment>/report.html`` (a local experiment only; ``ser-ray report
    --from DIR`` renders one from any local copy).

    A finished search whose saved config differs from ``config`` (other than where trials run) is
    refused with the settings that differ (``on_change="refuse"``), or searched again from scratch
    (``"redo"``, for callers that own the experiment directory, such as the demo).
    """
    from ser_ray.ensemble.commands import build_bundle
    from ser_ray.errors import UserError
    from ser_ray.tune.search import run_search

    stages = stages or Stages(3 if config.annotate else 2)
    experiment = config.experiment
    bundle, best_json = experiment.bundle, experiment.best_json
    result = {"experiment": experiment.root, "bundle": bundle}

    with stages(f"search: {config.search.num_samples} trials over {', '.join(config.search.families)} "
                f"-> {experiment.root}") as stage:
        changed = config_changes(experiment.read_best().get("_search", {}).get("config"), config.search) \
            if experiment.searched() else []
        if changed and on_change == "refuse":
            raise UserError(f"{experiment.root} was searched with other settings ({', '.join(changed[:6])}); "
                            "delete it, or give this search another name (--set name=...) or --out")
        if changed:
            print(f"      the settings changed ({', '.join(changed[:6])}): searching again", flush=True)
            storage.remove_tree(experiment.root)
        if experiment.searched():
            stage.skip("best.json and split.parquet exist with the same settings (delete the experiment to "
                       "search again)")
        else:
            search = run_search(config.search, resume=True)
            n_asha = int((search.table["stop_reason"] == "asha").sum()) if "stop_reason" in search.table else 0
            stage.summary = (f"{len(search.table)} trials, {n_asha} stopped early by ASHA; best "
                             + ", ".join(f"{family} val UA {b['val']['ua']:.3f}" for family, b in search.best.items()))
    result["best"] = {f: b for f, b in experiment.read_best().items() if not f.startswith("_")}

    with stages(f"ensemble bundle -> {bundle}") as stage:
        bundle_json = storage.join(bundle, "bundle.json")
        if storage.exists(bundle_json) and _modified(bundle_json) >= _modified(best_json):
            stage.skip("the bundle is newer than best.json")
            metrics = json.loads(storage.read_bytes(storage.join(bundle, "ensemble_metrics.json")))
        else:
            metrics = build_bundle([experiment.root], bundle)
            test = (metrics.get("test") or {}).get("ensemble", {})
            nan = float("nan")
            weights = ", ".join(f"{name} {w:.2f}" for name, w in metrics["validation"]["weights"].items())
            stage.summary = (f"weights {weights}; test speakers: UA {test.get('ua', nan):.3f} "
                             f"WA {test.get('wa', nan):.3f} macro-F1 {test.get('macro_f1', nan):.3f}")
    result["ensemble_report"] = metrics
    result["ensemble_test"] = (metrics.get("test") or {}).get("ensemble")

    if config.annotate:
        from ser_ray.annotate.commands import write_page
        from ser_ray.annotate.core import AnnotateConfig
        from ser_ray.annotate.offline import annotate_archive

        section = dict(config.annotate)
        source = section.pop("input")
        output = section.pop("output", None) or experiment.annotations
        with stages(f"annotate {source} -> {output}") as stage:
            summary = annotate_archive(source, output, bundle, AnnotateConfig(**section), progress=True)
            page = write_page(output)
            stage.summary = (f"{summary['n_processed']} files labelled ({summary['n_error']} errors), "
                             f"{summary['n_skipped']} already done" + (f"; archive page {page}" if page else ""))
        result.update(annotations=output, annotate=summary, archive_page=page)
    if report and not storage.is_s3(experiment.root):
        from ser_ray.report.html import render_report

        result["report"] = str(render_report(experiment.root, title=f"ser-ray run: {config.search.name}"))
        print(f"report {result['report']}", flush=True)
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
