"""``ser-ray demo``: the whole system end to end on the embedded synthetic corpus.

synthetic corpus -> manifest + describe -> speaker-disjoint split -> Ray Data features -> Optuna/ASHA
search over cnn, bigru_attn, logreg (on utterance functionals) and a tiny wav2vec2 (from a config
created locally: no downloads) -> ensemble bundle -> Ray Serve endpoint -> annotate a synthetic
archive of long recordings through the endpoint -> ``report.html``. Every stage is the same code the individual commands run.

The search and the bundle are ``ser-ray run``'s stages (``ser_ray.pipeline``) on that corpus, so a
second run in the same ``--out`` reuses the corpus, the archive, the feature cache and, when the budget
and seed are the same, the finished search and bundle (saying so); the annotations and the report are
redone. Another budget or seed searches again from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

log = logging.getLogger("ser_ray.demo")

# What each budget runs; "small" is the README's first command (<= 10 min on 2 cores).
BUDGETS: dict[str, dict] = {
    # trials: searched trials on top of each family's default-config trial
    "tiny": dict(actors=10, trials=1, epochs=3, archive_files=2, archive_max_s=40.0, wav2vec2=True),
    "small": dict(actors=16, trials=3, epochs=6, archive_files=3, archive_max_s=60.0, wav2vec2=True),
    "medium": dict(actors=24, trials=9, epochs=12, archive_files=6, archive_max_s=180.0, wav2vec2=True),
}


@dataclasses.dataclass
class DemoConfig:
    out: str = "demo-out"
    budget: str = "small"
    address: str | None = None  # None: start (and stop) a local Ray; "auto": a running `ray start --head`
    seed: int = 0
    port: int = 8000
    n_mels: int = 64  # smaller than SonoNet's 128 so the demo trains in minutes on a laptop CPU

    def __post_init__(self):
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; choose one of {sorted(BUDGETS)}")

    @property
    def plan(self) -> dict:
        return BUDGETS[self.budget]


def tiny_wav2vec2(directory: Path, num_labels: int) -> str:
    """A small randomly initialised wav2vec2 saved with ``save_pretrained``: the real loading code
    (``from_pretrained(directory)``) runs without any hub access."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    if (directory / "config.json").exists():
        return str(directory)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, num_labels=num_labels,
        classifier_proj_size=32,
    )
    Wav2Vec2ForSequenceClassification(config).save_pretrained(directory)
    return str(directory)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns the paths and headline numbers (also printed at the end)."""
    import ray

    from ser_ray.corpora import build_manifest
    from ser_ray.corpora.manifest import write_manifest
    from ser_ray.corpora.synthetic import generate
    from ser_ray.pipeline import PipelineConfig, Stages, run_pipeline
    from ser_ray.report.eda import describe

    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = cfg.plan
    stages = Stages(7)
    for stale in ("bundle", "splits"):  # where demos before `ser-ray run` put them; the report would find them
        shutil.rmtree(out / stale, ignore_errors=True)
    throughput: dict = {}

    with stages("synthetic corpus"):
        corpus = out / "corpus"
        meta_path = corpus / "synthetic.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("seed") == cfg.seed and len(meta.get("actors", [])) == plan["actors"]:
            print(f"      reusing {corpus}")
        else:
            shutil.rmtree(corpus, ignore_errors=True)
            generate(corpus, actors=plan["actors"], seed=cfg.seed)

    with stages("manifest and corpus description"):
        manifest, report = build_manifest("synthetic", str(corpus))
        write_manifest(manifest, str(out / "manifest.parquet"))
        describe(manifest, out / "eda")
        print(f"      {len(manifest)} clips, {manifest['speaker'].nunique()} speakers, "
              f"{manifest['emotion'].nunique()} emotions -> {out / 'manifest.parquet'}")

    started_ray = False
    try:
        with stages("Ray"):
            from ser_ray.session import connect

            started_ray = connect(cfg.address)
            print(f"      cluster resources: {ray.cluster_resources()}")
            # every epoch's dataset split would draw its own progress bar; the stages report instead
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False

        result = run_pipeline(PipelineConfig(search=_search_config(cfg, out, corpus)), stages, on_change="redo",
                              report=False)  # the demo's report covers every stage, below
        bundle_dir, ens_report = Path(result["bundle"]), result["ensemble_report"]
        annotation = _annotate(cfg, out, bundle_dir, stages, throughput, plan)
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # Serve was never started
            pass
        if started_ray:
            ray.shutdown()

    with stages("report"):
        from ser_ray.report.html import render_report

        throughput.update({f"stage seconds: {k}": v for k, v in stages.times.items()})
        throughput["total demo seconds"] = round(time.perf_counter() - stages.start, 1)
        _write_json(out / "throughput.json", throughput)
        report_path = render_report(out, title="ser-ray demo report")

    ens_test = (ens_report.get("test") or {}).get("ensemble", {})
    summary = {
        "report": str(report_path),
        "bundle": str(bundle_dir),
        "annotations": str(out / "annotations"),
        "ensemble_test_ua": ens_test.get("ua"),
        "ensemble_test_wa": ens_test.get("wa"),
        "window_accuracy": annotation.get("window_accuracy"),
        "seconds": throughput["total demo seconds"],
    }
    print("done")
    for key, value in summary.items():
        print(f"      {key}: {value:.3f}" if isinstance(value, float) else f"      {key}: {value}")
    return summary


def _search_config(cfg: DemoConfig, out: Path, corpus: Path):
    """The search the demo runs: every family on the synthetic corpus, sized by the budget."""
    from ser_ray.corpora.labels import SIX_CLASS
    from ser_ray.tune.config import SearchConfig

    plan = cfg.plan
    # logreg: a classical member on utterance functionals, fitted in seconds inside its trial
    families = ["cnn", "bigru_attn", "logreg"] + (["wav2vec2"] if plan["wav2vec2"] else [])
    space: dict = {}
    if plan["wav2vec2"]:
        pretrained = tiny_wav2vec2(out / "pretrained" / "tiny-wav2vec2", len(SIX_CLASS))
        space["wav2vec2"] = {"hparams": {"pretrained": pretrained, "freeze": "none"}}
    # Tune turns the first Ctrl-C into "stop the experiment and return"; the demo should stop whole.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    return SearchConfig(
        name="search",
        data={"corpus": "synthetic", "root": str(corpus), "protocol": "fixed", "val_fraction": 0.15,
              "cache_root": str(out / "cache"), "features": {"n_mels": cfg.n_mels}},
        families=families,
        num_samples=plan["trials"] + len(families),
        max_epochs=plan["epochs"],
        grace_period=2,
        reduction_factor=2,
        max_concurrent_trials=2,
        seed=cfg.seed,
        storage_path=str(out),
        tpe_startup_trials=max(1, plan["trials"] // 2),
        train={"patience": 0, "label_map": "six"},
        space=space,
        # two trials at a time on a 2-core laptop: trial process 0.25 + Train worker 0.75 CPU each
        resources={f: {"cpu": 0.75, "gpu": 0.25} for f in families},
    )


def _annotate(cfg: DemoConfig, out: Path, bundle_dir: Path, stages, throughput: dict, plan: dict) -> dict:
    import pandas as pd
    from ray import serve

    from ser_ray.annotate.accuracy import window_accuracy
    from ser_ray.annotate.writer import ResultWriter
    from ser_ray.corpora.synthetic import generate_archive
    from ser_ray.report.archive import render_archive
    from ser_ray.report.timeline import plot_label_distribution, plot_timeline
    from ser_ray.annotate.endpoint import annotate_via_endpoint
    from ser_ray.auth import digest
    from ser_ray.serve.app import ServeConfig, build_app

    with stages("Ray Serve endpoint + annotating a synthetic archive of long recordings"):
        archive = out / "archive"
        if not (archive / "timeline.csv").exists():
            generate_archive(archive, files=plan["archive_files"], seed=cfg.seed, max_s=plan["archive_max_s"])
        timeline = pd.read_csv(archive / "timeline.csv")
        serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
        # three members and the ingress must fit next to each other on a 2-core laptop
        key = secrets.token_urlsafe(24)  # this run's API key: the endpoint never runs open
        config = ServeConfig(bundle=str(bundle_dir), allowed_roots=[str(archive)], num_cpus=0.25, ingress_num_cpus=0.25,
                             api_key_sha256=digest(key))
        serve.run(build_app(config), name="ser-ray", route_prefix="/")
        url = f"http://127.0.0.1:{cfg.port}"
        print(f"      endpoint {url} (GET /healthz, /labels; POST /predict, /annotate)")
        annotations = out / "annotations"
        shutil.rmtree(annotations, ignore_errors=True)
        summary = annotate_via_endpoint(str(archive), str(annotations), url, batch_files=1, concurrency=2,
                                        api_key=key)
        files, segments = ResultWriter(str(annotations)).read_tables()
        acc = window_accuracy(segments, timeline)
        ok = files[files["status"] == "ok"]
        for uri in ok["uri"][:8]:  # one emotion timeline per recording (the report shows each)
            truth = timeline[timeline["file"].map(lambda f: Path(str(f)).name) == Path(uri).name]
            plot_timeline(segments, uri, str(annotations / f"timeline-{Path(uri).stem}.png"), truth=truth)
        plot_label_distribution(files, str(annotations / "label_distribution.png"))
        render_archive(files, segments, annotations / "archive.html", title="Archive: the synthetic recordings")
        audio_s = float(summary.get("audio_s", 0.0))
        wall_s = float(summary.get("wall_s", 0.0)) or float("nan")
        annotation = {
            "files": int(len(files)),
            "ok": int((files["status"] == "ok").sum()),
            "errors": int((files["status"] == "error").sum()),
            "windows": int(len(segments)),
            "audio_minutes": round(audio_s / 60, 2),
            "window_accuracy": round(float(acc), 4),
        }
        _write_json(annotations / "annotation_summary.json", annotation)
        throughput["endpoint annotation (audio s per wall s)"] = round(audio_s / wall_s, 1)
        print(f"      {annotation['files']} files, {annotation['windows']} windows, window accuracy vs "
              f"ground truth {acc:.3f}, {audio_s / wall_s:.1f} audio s per wall s")
    return annotation


# -- CLI -----------------------------------------------------------------------------------------


def add_arguments(parser, command: str = "demo") -> None:
    parser.add_argument("--out", default="demo-out", help="result directory (default: demo-out)")
    parser.add_argument("--budget", default="small", choices=sorted(BUDGETS),
                        help="how much to run: tiny (tests), small (default, minutes), medium")
    parser.add_argument("--address", default=None,
                        help="Ray address to join (`auto` for a running `ray start --head`); default: a local Ray")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the Serve endpoint")


def run(args) -> int:
    cfg = DemoConfig(out=args.out, budget=args.budget, address=args.address, seed=args.seed, port=args.port)
    try:
        run_demo(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted: Ray and Serve were shut down", flush=True)
        return 130
    return 0
