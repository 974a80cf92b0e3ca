"""Inference backends for ensemble members: the PyTorch module as saved, or a faster equal form of it.

``choose_runner(model, feature_config, device, backend)`` returns what inference calls for a member
(a callable: features tensor ``[N, C, F]`` -> logits tensor) and its backend's name:

- ``eager``: the module as saved.
- ``torchscript``: ``torch.jit.freeze`` + ``optimize_for_inference`` of a trace; folds batch norm
  into the convolutions and picks oneDNN kernels on CPU.
- ``onnx``: an ONNX Runtime session (CPU) of the module exported in memory (``torch.onnx.export``).

On 2 CPU cores, one thread per process, default sizes, ms per 3 s window at batch 1 / 8 (see
``benchmarks/serve_latency.py``): cnn eager 7.5 / 10.0, TorchScript 3.7 / 3.3, ONNX Runtime 3.2 / 3.4;
bigru_attn eager 10.7 / 3.6, TorchScript 11.1 / 3.5, ONNX Runtime 2.6 / 1.9.

A converted form is used only when its logits equal the module's (``ATOL``, at several batch sizes,
so a trace that baked in its example's batch size is caught). ``auto`` takes ONNX Runtime on the CPU,
else TorchScript, else the module: by the figures above ONNX Runtime is never slower here, and timing
the forms at start-up cost every annotation actor seconds (measuring picked the same forms). A model
that cannot be converted (a Hugging Face wav2vec2 may not trace) stays eager. Nothing is written to
disk.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Callable

import torch
from torch import nn

from ser_ray.features.config import FeatureConfig

log = logging.getLogger(__name__)

BACKENDS = ("auto", "eager", "torchscript", "onnx")
ATOL = 1e-4
# auto converts models up to this many parameters and buffers: exporting a pretrained wav2vec2 (95 M)
# would cost every replica and annotation actor minutes at start-up
AUTO_MAX_VALUES = 20_000_000
Runner = Callable[[torch.Tensor], torch.Tensor]


class OnnxRunner:
    """An ONNX Runtime session (CPU) called like the module it was exported from."""

    def __init__(self, onnx_bytes: bytes, threads: int):
        import onnxruntime as ort

        self.onnx_bytes = onnx_bytes  # what ser-ray export writes
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)  # the caller's CPU budget, like torch's threads
        options.inter_op_num_threads = 1
        # no busy-waiting between calls: the cores are shared with torch (features) and other replicas
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"features": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def to_torchscript(model: nn.Module, example: torch.Tensor, portable: bool = False) -> torch.jit.ScriptModule:
    """A frozen trace; unless ``portable`` (to save to a file), also optimised for inference here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values: the equality check decides
        frozen = torch.jit.freeze(torch.jit.trace(model.eval(), example))
        return frozen if portable else torch.jit.optimize_for_inference(frozen)


def to_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """``model`` as ONNX bytes with a variable batch size (input ``features``, output ``logits``)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(model.eval(), (example,), buffer, input_names=["features"], output_names=["logits"],
                          dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return buffer.getvalue()


def _convert(model: nn.Module, backend: str, example: torch.Tensor, device: str) -> Runner:
    if backend == "torchscript":
        return to_torchscript(model, example)
    if str(device) != "cpu":
        raise ValueError("ONNX Runtime runs members on the CPU here")
    return OnnxRunner(to_onnx(model, example), torch.get_num_threads())


def check_inputs(feature_config: FeatureConfig, device: str = "cpu") -> list[torch.Tensor]:
    """Random feature batches a converted form is checked on; the first is the export example. Batch
    sizes other than the example's (8) too: a trace can bake its example's size in."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn((n, *feature_config.shape), generator=generator).to(device) for n in (8, 1, 3)]


@torch.inference_mode()
def check_equal(runner: Runner, inputs: list[torch.Tensor], wanted: list[torch.Tensor]) -> None:
    """Raise ValueError unless ``runner`` gives ``wanted`` (the module's logits) on ``inputs`` to ``ATOL``."""
    for x, want in zip(inputs, wanted):
        got = runner(x).float()
        if got.shape != want.shape or not torch.allclose(got, want, atol=ATOL, rtol=ATOL):
            raise ValueError(f"its logits differ from the model's by up to {float((got - want).abs().max()):.2g}")


@torch.inference_mode()
def choose_runner(model: nn.Module, feature_config: FeatureConfig, device: str = "cpu",
                  backend: str = "auto") -> tuple[Runner, str]:
    """``(runner, backend name)`` for ``model``: the form ``backend`` names, or for ``auto`` the first of
    ONNX Runtime (CPU only) and TorchScript, when its logits equal the model's; else ``(model, "eager")``."""
    if backend not in BACKENDS:
        raise ValueError(f"inference backend {backend!r}: choose one of {list(BACKENDS)}")
    model.eval()
    if backend == "eager":
        return model, "eager"
    size = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    if backend == "auto" and size > AUTO_MAX_VALUES:
        log.info("%s: %d parameters, over auto's limit of %d; runs eager (choose a backend to convert it)",
                 type(model).__name__, size, AUTO_MAX_VALUES)
        return model, "eager"
    inputs = check_inputs(feature_config, device)
    wanted = [model(x).float() for x in inputs]
    if backend != "auto":
        candidates = [backend]
    else:
        candidates = ["onnx", "torchscript"] if str(device) == "cpu" else ["torchscript"]
    for name in candidates:
        try:
            runner = _convert(model, name, inputs[0], device)
            check_equal(runner, inputs, wanted)
        except Exception as exc:  # an optimisation only: a form that fails or differs is not used
            (log.warning if backend != "auto" else log.info)(
                "%s as %s: not used (%s: %s)", type(model).__name__, name, type(exc).__name__, exc)
            continue
        return runner, name
    return model, "eager"
