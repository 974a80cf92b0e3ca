"""``ser-ray``: one subcommand per stage; each stage module owns its arguments.

A stage's command module defines ``add_arguments(parser)`` and ``run(args) -> int``; its docstring's
first line is the help text. Modules are imported only for the command that runs, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ser_ray.errors import UserError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("ser_ray.corpora.commands", "generate the embedded synthetic CREMA-D-shaped corpus"),
    "manifest": ("ser_ray.corpora.commands", "build a manifest from a corpus directory or s3:// prefix"),
    "describe": ("ser_ray.corpora.commands", "class balance, durations and speakers as tables and plots"),
    "splits": ("ser_ray.corpora.commands", "speaker-disjoint folds or fixed splits of a manifest"),
    "prepare": ("ser_ray.features.commands", "decode audio and extract features with Ray Data into a cache"),
    "train": ("ser_ray.train.commands", "train one model on one split with Ray Train"),
    "cv": ("ser_ray.train.commands", "cross-validate a model family speaker-independently (or cross-corpus)"),
    "compare": ("ser_ray.train.commands", "cross-validate several model families the same way; one table"),
    "tune": ("ser_ray.tune.commands", "hyperparameter search with Ray Tune + Optuna + ASHA"),
    "ensemble": ("ser_ray.ensemble.commands", "fit an ensemble of the best models into a bundle"),
    "export": ("ser_ray.ensemble.export", "export a bundle's members as ONNX or TorchScript files"),
    "serve": ("ser_ray.serve.commands", "serve a bundle over HTTP with Ray Serve"),
    "annotate": ("ser_ray.annotate.commands", "label an audio archive (offline or via an endpoint)"),
    "report": ("ser_ray.report.commands", "render the HTML report of a result directory"),
    "run": ("ser_ray.pipeline", "the whole flow on your corpus: search, ensemble bundle, label an archive"),
    "demo": ("ser_ray.demo", "the whole system end to end on the embedded corpus"),
}


# errors of input the user gave (files, config keys, values); anything else is a bug and keeps its traceback
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, UserError)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ser-ray",
        description="Speech emotion recognition as a distributed batch system on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen command's module is imported
            getattr(importlib.import_module(module), "add_arguments")(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        # a missing file, an unknown key or a bad value is the user's to fix: one line, no traceback
        print(f"ser-ray {args.command}: error: {exc} (-v shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
