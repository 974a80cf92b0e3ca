"""CLI for the data stage: ``synth``, ``manifest``, ``describe``, ``splits``."""

from __future__ import annotations

import argparse
import json
import logging

from ser_ray import storage

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "synth":
        parser.add_argument("--out", required=True, help="directory to write the corpus (or archive) into")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--actors", type=int, default=24, help="number of synthetic actors (corpus mode)")
        parser.add_argument("--archive", action="store_true", help="write long recordings + timeline.csv instead")
        parser.add_argument("--files", type=int, default=6, help="number of long recordings (archive mode)")
        parser.add_argument("--workers", type=int, default=2, help="processes (output does not depend on it)")
    elif command == "manifest":
        from ser_ray.corpora import CORPORA
        from ser_ray.corpora.labels import LABEL_MAPS

        parser.add_argument("--corpus", required=True, choices=CORPORA)
        parser.add_argument("--root", required=True, help="corpus directory or s3://bucket/prefix")
        parser.add_argument("--out", required=True, help="manifest file: .parquet or .csv, local or s3://")
        parser.add_argument(
            "--label-map",
            choices=sorted(LABEL_MAPS),
            default=None,
            help="map labels now (default: keep every canonical label; maps usually apply at training)",
        )
    elif command == "describe":
        parser.add_argument("--manifest", required=True)
        parser.add_argument("--out", required=True, help="directory for the CSV tables and PNG plots")
    elif command == "splits":
        from ser_ray.splits import PROTOCOLS

        parser.add_argument("--manifest", required=True)
        parser.add_argument("--protocol", required=True, choices=PROTOCOLS)
        parser.add_argument("--k", type=int, default=5, help="folds for kfold")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--leaky", action="store_true", help="allow --protocol random (speakers overlap; output marked leaky)"
        )
        parser.add_argument("--out", required=True, help="manifest with the fold/split column; fold lists go to OUT.folds.json")


def run(args: argparse.Namespace) -> int:
    return {"synth": _synth, "manifest": _manifest, "describe": _describe, "splits": _splits}[args.command](args)


def _synth(args) -> int:
    from ser_ray.corpora import synthetic

    if args.archive:
        timeline = synthetic.generate_archive(args.out, args.files, args.seed, workers=args.workers)
        print(f"wrote {args.files} recordings and timeline.csv ({len(timeline)} segments) to {args.out}")
    else:
        meta = synthetic.generate(args.out, args.actors, args.seed, workers=args.workers)
        print(f"wrote {meta['n_files']} clips of {args.actors} actors and synthetic.json to {args.out}")
    return 0


def _manifest(args) -> int:
    from ser_ray.corpora import build_manifest
    from ser_ray.corpora.manifest import write_manifest

    df, report = build_manifest(args.corpus, args.root, args.label_map)
    if df.empty:
        log.error("%s: no %s clips found; check --root and --corpus", args.root, args.corpus)
        return 1
    write_manifest(df, args.out)
    print(f"{args.out}: {report['rows']} clips, {report['speakers']} speakers, {len(report['emotions'])} emotions")
    for emotion, count in report["emotions"].items():
        print(f"  {emotion:<10} {count}")
    for reason, entry in report["skipped"].items():
        print(f"  skipped {entry['count']} ({reason}), e.g. {entry['examples'][0]}")
    return 0


def _describe(args) -> int:
    from ser_ray.corpora.manifest import read_manifest
    from ser_ray.report.eda import describe, describe_tables

    df = read_manifest(args.manifest)
    for name, table in describe_tables(df).items():
        if name != "durations_by_speaker" or len(table) <= 30:
            print(f"\n{name}\n{table.to_string()}")
    paths = describe(df, args.out)
    print(f"\nwrote {len(paths)} files to {args.out}")
    return 0


def _splits(args) -> int:
    from ser_ray.corpora.manifest import read_manifest, write_manifest
    from ser_ray.splits import apply_protocol, assert_speaker_disjoint, fold_lists

    df = read_manifest(args.manifest)
    try:
        df = apply_protocol(df, args.protocol, k=args.k, seed=args.seed, leaky=args.leaky)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if not args.leaky:
        assert_speaker_disjoint(df)
    write_manifest(df, args.out)
    folds = fold_lists(df, args.protocol, args.seed)
    storage.write_bytes(args.out + ".folds.json", (json.dumps(folds, indent=1) + "\n").encode())
    print(f"{args.out}: {args.protocol}{' (LEAKY)' if folds['leaky'] else ''}")
    for part, speakers in folds["speakers"].items():
        print(f"  {folds['column']} {part}: {folds['clips'][part]} clips, {len(speakers)} speakers")
    return 0
