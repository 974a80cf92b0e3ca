"""``ser-ray tune``: hyperparameter search with Ray Tune + Optuna (TPE) + ASHA on validation UA."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command: str = "tune") -> None:
    parser.add_argument("--config", required=True, help="YAML tune config (see configs/tune-*.yaml)")
    parser.add_argument("--families", help="comma-separated model families, e.g. cnn,bigru_attn,wav2vec2")
    parser.add_argument("--num-samples", type=int, help="trials in all")
    parser.add_argument("--max-epochs", type=int, help="epochs of a trial ASHA never stops")
    parser.add_argument("--root", help="corpus directory or s3:// prefix (overrides data.root)")
    parser.add_argument("--folds", help="published folds (JSON/CSV test speakers per fold); data.test_fold "
                                        "picks the held-out one")
    parser.add_argument("--name", help="experiment name (a directory under --out)")
    parser.add_argument("--out", help="storage path for the experiment: a local directory or s3:// prefix")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set grace_period=1 --set data.features.n_mels=64")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted experiment <out>/<name> (finished trials are kept)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS if set, else a local Ray)")


def config_from_args(args):
    from ser_ray.tune.config import load_search_config

    return load_search_config(
        args.config, args.overrides, families=args.families, num_samples=args.num_samples, max_epochs=args.max_epochs,
        name=args.name, storage_path=args.out, **{"data.root": args.root, "data.folds": getattr(args, "folds", None)},
    )


def init_ray(address: str | None = None) -> None:
    """Join ``address`` / ``RAY_ADDRESS`` / the job's cluster, else start a local Ray with the dashboard.

    The dashboard (State API) is what lets Ray Train free the resources of a trial ASHA stops.
    """
    from ser_ray.session import connect

    connect(address)


def print_summary(result) -> None:
    table = result.table
    n_asha = int((table["stop_reason"] == "asha").sum()) if "stop_reason" in table else 0
    print(f"{len(table)} trial(s), {n_asha} stopped early by ASHA -> {result.path}")
    for family, best in result.best.items():
        test = best.get("test", {})
        print(f"  {family}: trial {best['trial_id']} val UA {best['val']['ua']:.3f}"
              + (f"  test UA {test['ua']:.3f} WA {test['wa']:.3f} macro-F1 {test['macro_f1']:.3f}" if test else "")
              + f"  model {best['checkpoint_path']}")
    for note in result.notes:
        print(f"  note: {note}")


def run(args) -> int:
    from ser_ray.tune.search import run_search

    cfg = config_from_args(args)
    init_ray(args.address)
    print_summary(run_search(cfg, resume=args.resume))
    return 0
