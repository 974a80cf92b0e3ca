"""``ser-ray train`` (one model, one split), ``ser-ray cv`` (every fold, or cross-corpus with
``--test-corpus``) and ``ser-ray compare`` (several families, one table) with Ray Train."""

from __future__ import annotations

import argparse
import json
import logging

from ser_ray.models import MODELS
from ser_ray.train.config import PROTOCOLS, load_config

log = logging.getLogger(__name__)

CORPORA = ("cremad", "ravdess", "emodb", "synthetic")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "train":
        parser.add_argument("--config", required=True, help="YAML train config (see configs/)")
        parser.add_argument("--fold", type=int, default=None, help="test fold (default: data.test_fold)")
    else:
        parser.add_argument("--config", default=None, help="YAML train config; flags below override it")
        parser.add_argument("--corpus", choices=CORPORA, help="corpus adapter")
        parser.add_argument("--root", help="corpus directory or s3:// prefix")
        parser.add_argument("--corpora", nargs="+", metavar="CORPUS=ROOT",
                            help="several corpora combined under the label map, e.g. emodb=DIR ravdess=DIR")
        parser.add_argument("--manifest", help="a manifest file instead of --corpus/--root")
        if command == "compare":
            parser.add_argument("--families", required=True,
                                help="comma-separated model families, each optionally with hyperparameters as "
                                     "FAMILY:key=value (several joined by '+'), e.g. logreg,svm:kernel=rbf,cnn "
                                     f"(of {', '.join(sorted(MODELS))})")
            parser.add_argument("--ensemble", action="store_true",
                                help="also score a per-fold ensemble of the families (weights and temperatures "
                                     "fitted on held-out predictions of each fold's non-test speakers)")
            parser.add_argument("--self-train", action="store_true",
                                help="with --ensemble, classical families and --set data.normalise_by=speaker: "
                                     "also self-train each fold's ensemble on its test speakers' unlabelled clips "
                                     "(confident pseudo-labels, threshold chosen on the training speakers)")
        else:
            parser.add_argument("--family", choices=sorted(MODELS), help="model family (see ser_ray/models)")
        parser.add_argument("--protocol", choices=PROTOCOLS, help="speaker-disjoint split protocol")
        parser.add_argument("--k", type=int, help="folds for --protocol kfold")
        parser.add_argument("--folds", help="published folds to use as given instead of --protocol: JSON "
                                            "(a list of test-speaker lists) or CSV (columns fold, speaker)")
        parser.add_argument("--epochs", type=int, help="maximum epochs per fold")
        parser.add_argument("--max-folds", type=int, default=None, help="run only the first N folds")
        if command == "cv":
            cross = parser.add_argument_group(
                "cross-corpus", "train on all of one corpus (model selection on its own speakers), "
                "test on all of another over the labels both share")
            cross.add_argument("--train-corpus", choices=CORPORA, help="training corpus (default: --corpus)")
            cross.add_argument("--train-root", help="training corpus directory or s3:// prefix (default: --root)")
            cross.add_argument("--test-corpus", choices=CORPORA, help="test corpus: switches cv to cross-corpus")
            cross.add_argument("--test-root", help="test corpus directory or s3:// prefix")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set lr=3e-4 --set hparams.dropout=0.5")
    parser.add_argument("--out", required=True, help="result directory")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS if set, else a local Ray)")


def _init_ray(address: str | None, config=None) -> None:
    import ray

    from ser_ray.models.classical import is_classical
    from ser_ray.session import check_fits, connect

    connect(address)
    if config is not None and not is_classical(config.family):  # classical fits need no workers
        gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
        # before any feature is prepared: a worker that no node can host would wait for ever
        check_fits({"CPU": config.cpus_per_worker, "GPU": config.gpus_per_worker if gpu else 0}, config.num_workers,
                   what=f"training {config.family}",
                   settings="cpus_per_worker / gpus_per_worker / num_workers (e.g. --set cpus_per_worker=1)")
    # Per-epoch dataset splits would each draw a progress bar; the loop logs epochs instead.
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def _corpora(items: list[str] | None) -> list[dict] | None:
    if not items:
        return None
    pairs = []
    for item in items:
        corpus, sep, root = item.partition("=")
        if not sep or corpus not in CORPORA or not root:
            raise SystemExit(f"--corpora {item!r}: expected CORPUS=ROOT with CORPUS one of {list(CORPORA)}")
        pairs.append({"corpus": corpus, "root": root})
    return pairs


def _cv_config(args):
    flags = {
        "data.corpus": getattr(args, "train_corpus", None) or args.corpus,
        "data.root": getattr(args, "train_root", None) or args.root,
        "data.corpora": _corpora(args.corpora), "data.manifest": args.manifest,
        "family": getattr(args, "family", None), "data.protocol": args.protocol, "data.k": args.k,
        "data.folds": args.folds,
        "epochs": args.epochs,
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    config = load_config(args.config, overrides + list(args.overrides))
    if not (config.data.manifest or config.data.sources()):
        raise SystemExit(f"ser-ray {args.command}: give --corpus and --root, --corpora, --manifest, "
                         "or a --config naming them")
    return config


def _print_summary(name: str, summary: dict, out: str) -> None:
    print(f"{name} ({len(summary['folds_run'])} fold(s)): "
          f"UA {summary['ua']['mean']:.3f} ± {summary['ua']['std']:.3f}  "
          f"WA {summary['wa']['mean']:.3f} ± {summary['wa']['std']:.3f}  "
          f"macro-F1 {summary['macro_f1']['mean']:.3f} ± {summary['macro_f1']['std']:.3f}  -> {out}")


def run(args) -> int:
    from ser_ray.train.cv import run_cv

    if args.command == "train":
        config = load_config(args.config, list(args.overrides))
        fold = config.data.test_fold if args.fold is None else args.fold
        _init_ray(args.address, config)
        summary = run_cv(config, args.out, folds=[fold])
    elif args.command == "compare":
        from ser_ray.train.compare import comparison_markdown, run_compare

        config = _cv_config(args)
        families = [f.strip().replace("+", ",") for f in args.families.split(",") if f.strip()]
        unknown = sorted({f.split(":")[0] for f in families} - set(MODELS))
        if unknown or not families:
            raise SystemExit(f"--families {args.families!r}: unknown {unknown}; choose from {sorted(MODELS)}")
        _init_ray(args.address)
        table = run_compare(config, families, args.out, max_folds=args.max_folds, ensemble=args.ensemble,
                            self_train=args.self_train)
        print(comparison_markdown(table, config))
        return 0
    elif args.test_corpus or args.test_root:
        from ser_ray.train.config import DataSpec
        from ser_ray.train.cross import run_cross_corpus

        if not (args.test_corpus and args.test_root):
            raise SystemExit("ser-ray cv: cross-corpus needs both --test-corpus and --test-root")
        config = _cv_config(args)
        _init_ray(args.address, config)
        summary = run_cross_corpus(config, config.data, DataSpec(corpus=args.test_corpus, root=args.test_root),
                                   args.out)
        dropped = summary["dropped_labels"]
        print(f"shared labels {summary['shared_labels']}; dropped {dropped['train_only']} "
              f"(only in {summary['train_corpus']}), {dropped['test_only']} (only in {summary['test_corpus']})")
        _print_summary(f"{config.family} {summary['train_corpus']} -> {summary['test_corpus']}", summary, args.out)
        return 0
    else:
        config = _cv_config(args)
        _init_ray(args.address, config)
        summary = run_cv(config, args.out, max_folds=args.max_folds)
    _print_summary(f"{config.family} {config.data.protocol}", summary, args.out)
    return 0
