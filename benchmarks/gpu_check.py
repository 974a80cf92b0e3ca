"""GPU readiness: the CUDA paths ser-ray takes, measured on whatever CUDA machine runs this.

    python benchmarks/gpu_check.py            # prints a table; exits 0 with "no CUDA" on a CPU machine

1. AMP training steps (autocast fp16 + GradScaler, pinned host memory) of the cnn and bigru_attn families
   against the same steps in fp32: steps/s, peak GPU memory, loss finite.
2. Feature extraction (log-mel, functionals) on the GPU against the CPU: clips/s and the largest difference.
3. Four Ray tasks holding 0.25 GPU each run at once on one GPU (what tune's `gpu: 0.25` trials rely on).
4. A Serve member on the GPU (`ser-ray serve --num-gpus 0.5`): /predict p50 latency and agreement with the
   CPU answer for the same clip.

Each check prints its own line and a failure does not stop the others; the exit status is the number of
failed checks. Nothing is downloaded: models are random, audio is generated.
"""

from __future__ import annotations

import argparse
import io
import secrets
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

LABELS = ["anger", "disgust", "fear", "happiness", "neutral", "sadness"]


def clips(n: int, seconds: float = 3.0, sr: int = 16_000) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    freqs = rng.uniform(100, 300, n)[:, None]
    return (0.3 * np.sin(2 * np.pi * freqs * t) + 0.05 * rng.standard_normal((n, len(t)))).astype(np.float32)


def check_amp_training(rows: list) -> None:
    from ser_ray.features.config import FeatureConfig
    from ser_ray.features.extractor import FeatureExtractor
    from ser_ray.models import build_model, family_feature_config

    waves = clips(64)
    for family, hparams in (("cnn", {"width": 16}), ("bigru_attn", {"hidden": 64})):
        fc = family_feature_config(family, FeatureConfig())
        x = torch.as_tensor(FeatureExtractor(fc)(waves)).pin_memory()
        y = torch.as_tensor(np.arange(len(waves)) % len(LABELS)).pin_memory()
        for amp in (False, True):
            torch.manual_seed(0)
            model = build_model(family, len(LABELS), fc, **hparams).cuda()
            optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
            scaler = torch.amp.GradScaler("cuda", enabled=amp)
            torch.cuda.reset_peak_memory_stats()
            steps, start, loss = 30, None, None
            for step in range(steps + 5):  # 5 warm-up steps
                if step == 5:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                xb, yb = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
                with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                    loss = torch.nn.functional.cross_entropy(model(xb), yb)
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
            torch.cuda.synchronize()
            rate = steps / (time.perf_counter() - start)
            rows.append({"check": f"train {family} {'AMP fp16' if amp else 'fp32'}", "value": f"{rate:.1f} steps/s",
                         "detail": f"batch 64, peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB, "
                                   f"loss {loss.item():.3f}", "ok": bool(torch.isfinite(loss))})


def check_features(rows: list) -> None:
    from ser_ray.features.config import FeatureConfig
    from ser_ray.features.extractor import FeatureExtractor

    waves = clips(256)
    for kind in ("logmel", "functionals"):
        config = FeatureConfig(kind=kind, n_mfcc=20, hop_length=160 if kind == "functionals" else 512)
        out = {}
        for device in ("cpu", "cuda"):
            extractor = FeatureExtractor(config, device=device)
            extractor(waves[:8])  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out[device] = extractor(waves)
            if device == "cuda":
                torch.cuda.synchronize()
            out[device + "_rate"] = len(waves) / (time.perf_counter() - start)
        diff = float(np.nanmax(np.abs(out["cpu"] - out["cuda"])))
        rows.append({"check": f"features {kind} GPU vs CPU", "value": f"{out['cuda_rate']:.0f} vs "
                     f"{out['cpu_rate']:.0f} clips/s", "detail": f"max |GPU - CPU| {diff:.2e}", "ok": diff < 1e-2})


def check_fractional_gpus(rows: list) -> None:
    import ray

    @ray.remote(num_gpus=0.25)
    def hold(seconds: float) -> tuple[float, float]:
        start = time.time()
        x = torch.randn(2048, 2048, device="cuda")
        while time.time() - start < seconds:
            x = x @ x / x.norm()
        torch.cuda.synchronize()
        return start, time.time()

    spans = ray.get([hold.remote(3.0) for _ in range(4)])
    overlap = min(end for _, end in spans) - max(start for start, _ in spans)
    rows.append({"check": "four 0.25-GPU tasks on one GPU", "value": f"overlap {overlap:.1f} s",
                 "detail": "all four ran at once" if overlap > 0 else "they ran one after another",
                 "ok": overlap > 0})


def check_serve_member_on_gpu(rows: list, workdir: Path) -> None:
    import httpx
    import soundfile as sf
    from ray import serve

    from ser_ray.auth import digest
    from ser_ray.ensemble.bundle import Bundle, Member, load_bundle, save_bundle
    from ser_ray.features.config import FeatureConfig
    from ser_ray.models import build_model
    from ser_ray.serve.app import ServeConfig, build_app

    fc = FeatureConfig(kind="logmel", window_s=3.0, n_mels=64)
    torch.manual_seed(0)
    members = [Member("cnn", build_model("cnn", len(LABELS), fc, width=16), fc, weight=1.0, temperature=1.0, name="cnn")]
    bundle_dir = str(workdir / "bundle")
    save_bundle(Bundle(LABELS, members, sample_rate=16_000, window_s=3.0), bundle_dir)
    buf = io.BytesIO()
    sf.write(buf, clips(1, 6.0)[0], 16_000, format="WAV")
    key = secrets.token_urlsafe(16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServeConfig(bundle=bundle_dir, num_gpus=0.5, num_cpus=1, api_key_sha256=digest(key))),
              name="gpu-check", route_prefix="/")
    try:
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {key}"}) as http:
            latencies, answer = [], None
            for _ in range(20):
                start = time.perf_counter()
                answer = http.post(f"http://127.0.0.1:{port}/predict", files={"file": ("clip.wav", buf.getvalue())})
                latencies.append(time.perf_counter() - start)
        cpu = load_bundle(bundle_dir).predict_proba(np.stack([clips(1, 6.0)[0][:48_000]]))[0]
        served = answer.json()["segments"][0]["probabilities"]
        diff = max(abs(served[label] - float(p)) for label, p in zip(LABELS, cpu))
        rows.append({"check": "Serve member on GPU (/predict)", "value": f"p50 {np.median(latencies[5:]) * 1e3:.0f} ms",
                     "detail": f"first window vs CPU bundle: max |Δp| {diff:.1e}", "ok": answer.status_code == 200 and diff < 1e-2})
    finally:
        serve.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA: nothing to check on this machine (run this script on a machine with an NVIDIA GPU)")
        return 0
    import ray

    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    rows: list = []
    failed = 0
    from ser_ray.session import use_serve_proxy

    use_serve_proxy()  # Serve's HTTP proxy as `ser-ray serve` picks it
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="ser-ray-gpu-check-") as tmp:
            for check in (check_amp_training, check_features, check_fractional_gpus,
                          lambda r: check_serve_member_on_gpu(r, Path(tmp))):
                try:
                    check(rows)
                except Exception:
                    failed += 1
                    rows.append({"check": getattr(check, "__name__", "serve"), "value": "FAILED",
                                 "detail": traceback.format_exc().strip().splitlines()[-1], "ok": False})
    finally:
        ray.shutdown()
    print("| check | value | detail | ok |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['check']} | {row['value']} | {row['detail']} | {'yes' if row['ok'] else 'NO'} |")
    return failed + sum(not row["ok"] for row in rows if row["value"] != "FAILED")


if __name__ == "__main__":
    sys.exit(main())
