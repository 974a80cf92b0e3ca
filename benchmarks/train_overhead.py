"""Ray Train overhead: the same CNN epochs on the same cached features, Ray Train vs a bare PyTorch loop.

    python benchmarks/train_overhead.py                       # EmoDB at ../shared/data/emodb
    python benchmarks/train_overhead.py --corpus synthetic --root data/synthetic --epochs 3

Both runs train + validate with the same model, batch size, optimizer and thread count, in this
process's Ray session. Prints per-epoch times (median over epochs after the first) and their ratio
(target <= 1.10), plus Ray Train's fixed start-up cost (worker group, dataset split) separately.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import numpy as np
import ray
import torch
from torch import nn

from ser_ray.corpora import build_manifest
from ser_ray.corpora.labels import CANONICAL, apply_label_map
from ser_ray.features.config import FeatureConfig
from ser_ray.features.pipeline import features_array, load_cache_pandas, prepare
from ser_ray.models import build_model
from ser_ray.train.config import TrainConfig
from ser_ray.train.loop import fit


def bare_epochs(train_df, val_df, labels, feature_config, cfg: TrainConfig) -> list[float]:
    """Plain PyTorch: TensorDataset + DataLoader, the same model/optimizer/loss/clipping/validation."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(int(cfg.cpus_per_worker))
    index = {label: i for i, label in enumerate(labels)}
    x, y = torch.from_numpy(features_array(train_df)), torch.tensor(train_df["emotion"].map(index).to_numpy())
    vx, vy = torch.from_numpy(features_array(val_df)), torch.tensor(val_df["emotion"].map(index).to_numpy())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True)
    model = build_model(cfg.family, len(labels), feature_config, **cfg.hparams)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        model.train()
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for i in range(0, len(vx), max(cfg.batch_size, 64)):
                model(vx[i:i + max(cfg.batch_size, 64)]).argmax(1)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="emodb")
    parser.add_argument("--root", default="../shared/data/emodb")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) for both loops")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    manifest, _ = build_manifest(args.corpus, args.root)
    manifest = apply_label_map(manifest, "six")
    labels = [label for label in CANONICAL if label in set(manifest["emotion"])]
    feature_config = FeatureConfig()
    cache_dir = tempfile.mkdtemp(prefix="ser-ray-bench-")
    cache = prepare(manifest.drop(columns=["emotion_original"]), cache_dir, feature_config, progress=False)
    rows = load_cache_pandas(cache)
    rows = rows[rows["error"].isna()]
    speakers = sorted(rows["speaker"].unique())
    val_mask = rows["speaker"].isin(speakers[:2])
    train_df, val_df = rows[~val_mask], rows[val_mask]
    cfg = TrainConfig(family="cnn", epochs=args.epochs, batch_size=args.batch_size, patience=0,
                      class_weighted=False, cpus_per_worker=args.cpus, use_gpu=False)
    print(f"{args.corpus}: {len(train_df)} train / {len(val_df)} val clips, features {feature_config.shape}, "
          f"cnn, batch {args.batch_size}, {args.cpus} threads, {args.epochs} epochs each")

    bare = bare_epochs(train_df, val_df, labels, feature_config, cfg)
    start = time.perf_counter()
    result = fit(train_df, val_df, labels, feature_config, cfg, storage_path=tempfile.mkdtemp(prefix="ser-ray-bench-run-"))
    ray_total = time.perf_counter() - start
    ray_epochs = [h["epoch_s"] for h in result.history]

    def steady(times):  # the first epoch of each carries warm-up (allocator, thread pools)
        return statistics.median(times[1:] if len(times) > 1 else times)

    b, r = steady(bare), steady(ray_epochs)
    print("bare PyTorch epoch s:", " ".join(f"{t:.2f}" for t in bare))
    print("Ray Train   epoch s:", " ".join(f"{t:.2f}" for t in ray_epochs))
    print(f"median epoch: bare {b:.2f} s, Ray Train {r:.2f} s, ratio {r / b:.3f} (target <= 1.10)")
    print(f"Ray Train fixed cost (fit() wall minus its epochs): {ray_total - sum(ray_epochs):.1f} s")
    ray.shutdown()


if __name__ == "__main__":
    main()
