"""export a bundle's members as ONNX or TorchScript files

``ser-ray export --bundle B --out DIR [--format onnx|torchscript]`` writes each member in that form,
the form written checked against the PyTorch module first (the equality check of
``Bundle.optimise_for_inference``), plus ``export.json``: labels, and per member its file, input
feature config and shape, temperature and weight, so the ensemble can run where only ONNX Runtime
or libtorch is installed: ``probabilities = sum_i weight_i * softmax(logits_i / temperature_i)``
over features from ``ser_ray.features.FeatureExtractor``. Serve and offline annotation do not need
these files: they convert members when they load a bundle (``--backend``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORT_JSON = "export.json"


def add_arguments(parser, command_name: str = "export") -> None:
    parser.add_argument("--bundle", required=True, help="bundle directory or s3:// prefix")
    parser.add_argument("--out", required=True, help="local directory for the exported members and export.json")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx")


def export_bundle(bundle_uri: str, out: str, fmt: str = "onnx") -> dict:
    """Write every member of ``bundle_uri`` in ``fmt`` under ``out``; return export.json's content."""
    from ser_ray.ensemble.bundle import load_bundle

    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: choose one of {sorted(FORMATS)}")
    return write_export(load_bundle(bundle_uri), out, fmt, source=str(bundle_uri))


@torch.inference_mode()
def write_export(bundle, out: str, fmt: str, source: str) -> dict:
    """``bundle``'s members in ``fmt`` under ``out``, plus export.json.

    Every member is converted and checked before anything is written. A member whose converted form
    does not equal its module (or cannot be converted) is refused with the reason, and then no file is
    written at all: a file that computes something else must not exist, nor half an ensemble.
    """
    from ser_ray.ensemble.runtime import OnnxRunner, check_equal, check_inputs, to_onnx, to_torchscript

    converted = []
    for m, weight in zip(bundle.members, bundle.weights()):
        inputs = check_inputs(m.feature_config)
        try:
            if fmt == "onnx":
                runner = OnnxRunner(to_onnx(m.model.eval(), inputs[0]), torch.get_num_threads())
            else:  # frozen, without optimize_for_inference: its prepacked oneDNN weights do not load back
                runner = to_torchscript(m.model, inputs[0], portable=True)
            check_equal(runner, inputs, [m.model(x).float() for x in inputs])
        except Exception as exc:
            raise ValueError(f"member {m.name!r} ({m.family}) cannot be exported as {fmt} with equal logits "
                             f"({type(exc).__name__}: {exc}); serve and annotate run it as it is; nothing "
                             "was written") from exc
        converted.append((m, weight, runner))
    out_dir = Path(out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    members = []
    for m, weight, runner in converted:
        path = out_dir / f"{m.name}{FORMATS[fmt]}"
        if fmt == "onnx":
            path.write_bytes(runner.onnx_bytes)
        else:
            torch.jit.save(runner, str(path))
        members.append({"name": m.name, "family": m.family, "file": path.name, "input": "features",
                        "input_shape": ["batch", *m.feature_config.shape], "output": "logits",
                        "feature_config": m.feature_config.to_dict(), "temperature": float(m.temperature),
                        "weight": float(weight)})
        log.info("member %s -> %s", m.name, path)
    description = {"format": fmt, "bundle": source, "labels": bundle.labels,
                   "sample_rate": bundle.sample_rate, "window_s": bundle.window_s, "members": members,
                   "combine": "sum over members of weight * softmax(logits / temperature)"}
    (out_dir / EXPORT_JSON).write_text(json.dumps(description, indent=1))
    return description


def run(args) -> int:
    description = export_bundle(args.bundle, args.out, args.format)
    print(f"{len(description['members'])} member(s) as {args.format} in {args.out} (see {EXPORT_JSON})")
    return 0
