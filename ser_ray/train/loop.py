"""The one training loop: a Ray Train worker function used for every model family.

``train_loop_per_worker(config)`` is driven only by its config dict (see :func:`loop_config`), so a
``TorchTrainer`` started by ``fit``, by ``ser-ray cv`` or by a Ray Tune trial runs the same code.
Each epoch reports metrics and a checkpoint (the ``save_model`` layout plus ``train_state.pt``);
a restarted worker group resumes from ``ray.train.get_checkpoint()``.

``fit(train_df, val_df, labels, feature_config, config)`` is the driver side: feature-cache rows ->
materialised Ray Datasets -> ``TorchTrainer.fit()`` -> :class:`TrainResult`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ser_ray.features.config import FeatureConfig
from ser_ray.train.config import EPOCHS, TrainConfig, config_to_plain

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"  # optimizer/scheduler/scaler state, epoch and history, next to the model
FOLD_RESULT = "result.json"  # a fold's best metrics and history, written by fit_folds' worker when the fold ends
LOCAL_SHUFFLE_ROWS = 2048  # rows in the per-worker shuffle buffer (datasets are shuffled once up front too)


# -- worker side -----------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> None:
    """Train one model on this worker's shards of the ``train`` and ``val`` datasets, or with
    ``config["folds"]`` one model per cross-validation fold, one fold after another.

    ``config``: ``train`` (TrainConfig as dict), ``labels``, ``feature_config`` (dict),
    ``class_counts`` (training clips per label) and the test-only ``fail_at_epoch`` /
    ``fail_marker`` (exit the worker process once at the start of that epoch).
    """
    import ray.train

    if config.get("folds"):
        _train_folds(config)
    else:
        _train_run(config, ray.train.get_checkpoint())


def _train_folds(config: dict) -> None:
    """Cross-validation folds in one worker group, so the group's start-up is paid once (see
    ``fit_folds``). ``config["folds"]``: per fold ``fold``, ``class_counts`` and ``out`` (where the
    fold's best model and ``result.json`` go); its datasets are ``train_<fold>`` and ``val_<fold>``. A
    restarted group skips the folds its checkpoint lists as done and resumes the fold it was training."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    resumed_fold, done = None, []
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, TRAIN_STATE), map_location="cpu", weights_only=False)["state"]
        resumed_fold, done = state.get("fold"), list(state.get("done_folds", []))
    for spec in config["folds"]:
        fold = spec["fold"]
        if fold in done:
            continue
        run = {**config, "class_counts": spec["class_counts"], "current_fold": fold}
        _train_run(run, checkpoint if fold == resumed_fold else None,
                   fold={"fold": fold, "done_folds": list(done), "out": spec["out"]})
        done.append(fold)


def _train_run(config: dict, checkpoint, fold: dict | None = None) -> None:
    """One model: resume from ``checkpoint`` if given, train, report every epoch. With ``fold`` (see
    ``_train_folds``) it reads that fold's datasets, tags its reports, and keeps the fold's best
    epoch itself (in ``fold["out"]``): Ray Train's checkpoints of such a run are for resuming only."""
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file

    from ser_ray.models import MODEL_WEIGHTS, build_model, ddp_options, on_epoch_start, param_groups

    cfg = TrainConfig.from_dict(config["train"])
    labels = list(config["labels"])
    feature_config = FeatureConfig.from_dict(config["feature_config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Ray pins OMP_NUM_THREADS to the worker's CPUs; torch follows the same budget.
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    np.random.seed(cfg.seed + rank)

    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    use_amp = cuda and cfg.amp is not False  # AMP only ever on CUDA

    model = build_model(cfg.family, len(labels), feature_config, **cfg.hparams)
    resumed: dict | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, MODEL_WEIGHTS)))
            resumed = torch.load(os.path.join(d, TRAIN_STATE), map_location="cpu", weights_only=False)
    # to device; DistributedDataParallel when world > 1, built as the family asks (TrainingHooks)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_options(model))
    core = getattr(model, "module", model)

    optimizer = torch.optim.AdamW(param_groups(core, cfg.lr), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    weight = _class_weights(config.get("class_counts"), labels) if cfg.class_weighted else None
    loss_fn = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device))
    augmenter = _augmenter(cfg.augment, feature_config, cfg.seed + rank)
    mixer = np.random.default_rng(cfg.seed * 7919 + rank)  # mixup's own draws, independent of the shuffle

    state = {"epoch": 0, "history": [], "best_val_ua": -1.0, "best_epoch": -1, "bad_epochs": 0, "stopped": False,
             "restarts": 0}
    if fold is not None:
        state.update(fold=fold["fold"], done_folds=fold["done_folds"], best_key=None)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        state = resumed["state"]
        state["restarts"] = state.get("restarts", 0) + 1
        log.info("rank %d: resuming at epoch %d from %s", rank, state["epoch"], checkpoint.path)

    suffix = "" if fold is None else f"_{fold['fold']}"
    train_shard = ray.train.get_dataset_shard("train" + suffix)
    val_shard = ray.train.get_dataset_shard("val" + suffix)
    dtypes = {"features": torch.float32, "label": torch.int64}

    for epoch in range(state["epoch"], cfg.epochs):
        if state["stopped"]:
            break
        _maybe_fail(config, epoch, rank)
        _maybe_hold(epoch, rank)
        if on_epoch_start(core, epoch) and world > 1:  # e.g. wav2vec2 unfroze its transformer
            # a DDP wrapper syncs only what was trainable when built: wrap the same module again
            model = ray.train.torch.prepare_model(core, parallel_strategy_kwargs=ddp_options(core))
        start = time.perf_counter()

        # train
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            dtypes=dtypes,
            device=device,
            pin_memory=cuda,
            local_shuffle_buffer_size=LOCAL_SHUFFLE_ROWS,
            local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + rank,
        )
        for batch in batches:
            x, y = batch["features"], batch["label"]
            if augmenter is not None:
                x = augmenter(x)  # training batches only
            lam, partner = _mixup(x, cfg.mixup, mixer)
            if partner is not None:  # mixup: a convex mix of two clips, and of their targets
                x = lam * x + (1 - lam) * x[partner]
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
                if partner is not None:
                    loss = lam * loss + (1 - lam) * loss_fn(logits.float(), y[partner])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        train_loss, train_acc, train_n = _all_sum([loss_sum, correct, torch.tensor(float(seen), device=device)])

        # validate
        val = _validate(model, val_shard, cfg, dtypes, device, len(labels), use_amp, loss_fn)
        if cfg.scheduler == "plateau":
            scheduler.step(val["val_ua"])
        else:
            scheduler.step()

        improved = val["val_ua"] > state["best_val_ua"] + 1e-9
        if improved:
            state.update(best_val_ua=val["val_ua"], best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["stopped"] = bool(cfg.patience and state["bad_epochs"] >= cfg.patience)
        state["epoch"] = epoch + 1
        metrics = {
            "epoch": epoch,
            EPOCHS: epoch + 1,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "train_n": train_n,  # clips seen this epoch over all workers: the shards cover the set once
            **val,
            "lr": float(optimizer.param_groups[-1]["lr"]),
            "best_val_ua": state["best_val_ua"],
            "best_epoch": state["best_epoch"],
            "early_stop": state["stopped"],
            "restarts": state["restarts"],  # worker-group restarts so far (resumed from checkpoints)
            "replicas_in_sync": _replicas_in_sync(core),
            "epoch_s": time.perf_counter() - start,
        }
        if fold is not None:
            metrics["fold"] = fold["fold"]
            key = epoch_rank(metrics)  # the best epoch as train_result picks it from a run's checkpoints
            if rank == 0 and (state["best_key"] is None or key > state["best_key"]):
                from ser_ray import storage
                from ser_ray.models import save_model

                save_model(storage.join(fold["out"], "model"), core, family=cfg.family, hparams=cfg.hparams, labels=labels,
                           feature_config=feature_config, extra={"epoch": epoch, "val_ua": metrics["val_ua"]})
                state.update(best_key=key, best_metrics=dict(metrics))
        state["history"].append(metrics)
        _report(metrics, rank, core, cfg, labels, feature_config, optimizer, scheduler, scaler, state)
        if state["stopped"]:
            log.info("early stop after epoch %d: no better val UA for %d epochs", epoch, cfg.patience)
    if fold is not None and rank == 0:  # result.json last: the fold's model is final
        from ser_ray import storage

        storage.write_bytes(storage.join(fold["out"], FOLD_RESULT), json.dumps(
            {"fold": fold["fold"], "best_metrics": state.get("best_metrics"), "history": state["history"]},
            default=float).encode())


def _mixup(x: torch.Tensor, alpha: float, rng: np.random.Generator):
    """``(lambda, partner indices)`` of a mixup draw, or ``(1, None)`` when mixup is off."""
    if alpha <= 0 or len(x) < 2:
        return 1.0, None
    lam = float(rng.beta(alpha, alpha))
    return max(lam, 1 - lam), torch.as_tensor(rng.permutation(len(x)), device=x.device)


def _validate(model, shard, cfg, dtypes, device, num_classes, use_amp, loss_fn) -> dict:
    """Validation loss and UA/WA/macro-F1 from a confusion matrix summed over all workers."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=max(cfg.batch_size, 64), dtypes=dtypes, device=device):
            x, y = batch["features"], batch["label"]
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                logits = model(x).float()
            # unweighted loss: comparable across runs whatever the class weighting
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
            flat = y * num_classes + logits.argmax(1)
            confusion += torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)
    if _distributed():
        torch.distributed.all_reduce(confusion)
        torch.distributed.all_reduce(loss_sum)
    from ser_ray.train.metrics import scores_from_confusion

    scores = scores_from_confusion(confusion.cpu().numpy())
    n = max(float(confusion.sum()), 1.0)
    return {
        "val_n": int(confusion.sum()),  # over all workers: the whole validation set
        "val_loss": float(loss_sum) / n,
        "val_ua": scores["ua"],
        "val_wa": scores["wa"],
        "val_macro_f1": scores["macro_f1"],
    }


def _report(metrics, rank, core, cfg, labels, feature_config, optimizer, scheduler, scaler, state) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (model + training state)."""
    import ray.train

    from ser_ray.models import save_model

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="ser-ray-ckpt-") as d:
        save_model(
            d, core, family=cfg.family, hparams=cfg.hparams, labels=labels, feature_config=feature_config,
            extra={"epoch": metrics["epoch"], "val_ua": metrics["val_ua"]},
        )
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "state": state, "train_config": cfg.to_dict()},
            os.path.join(d, TRAIN_STATE),
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _scheduler(optimizer, cfg: TrainConfig):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.lr * 0.01)
    # halve the LR after a few epochs without a better val UA; stop early a little later
    plateau = max(1, min(3, cfg.patience // 2 if cfg.patience else 3))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=plateau)


def _class_weights(class_counts: dict | None, labels: list[str]) -> torch.Tensor | None:
    """Inverse-frequency weights normalised to mean 1 (a class without clips gets weight 0)."""
    if not class_counts:
        return None
    counts = np.array([float(class_counts.get(label, 0)) for label in labels])
    weights = np.where(counts > 0, counts.sum() / (len(labels) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _augmenter(settings: dict, feature_config: FeatureConfig, seed: int):
    """The training-batch augmenter (``ser_ray.audio.augment.Augmenter``), or None when off."""
    if not settings:
        return None
    from ser_ray.audio.augment import Augmenter

    augmenter = Augmenter(**{**settings, "seed": seed})
    kind = "waveform" if feature_config.kind == "waveform" else "features"
    return lambda x: augmenter(x, kind=kind)


def _replicas_in_sync(model: nn.Module) -> bool:
    """True when every worker holds the same weights (always with one worker). A parameter DDP does
    not sync (e.g. one unfrozen after the wrapper was built) drifts apart between workers; one scalar
    checksum per worker per epoch catches it."""
    if not _distributed():
        return True
    with torch.no_grad():
        checksum = sum(p.detach().double().sum() for p in model.parameters())
        both = torch.stack([checksum, -checksum]).to(next(model.parameters()).device)
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)  # (max, -min) over workers
    in_sync = bool(abs(float(both[0] + both[1])) <= 1e-6 * max(1.0, abs(float(both[0]))))
    if not in_sync:
        log.warning("workers' weights differ: a parameter is trained without being synchronised")
    return in_sync


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _all_sum(values: list[torch.Tensor]) -> tuple[float, float, int]:
    """(mean loss, accuracy, count) from per-worker (loss sum, correct, count), summed over workers."""
    stacked = torch.stack([v.double() for v in values])
    if _distributed():
        torch.distributed.all_reduce(stacked)
    loss_sum, correct, count = stacked.tolist()
    n = int(count)
    count = max(count, 1.0)
    return loss_sum / count, correct / count, n


def _maybe_fail(config: dict, epoch: int, rank: int) -> None:
    """Test hook: kill this worker process once, at the start of ``fail_at_epoch`` (of fold
    ``fail_at_fold`` when given, in a multi-fold run)."""
    marker = config.get("fail_marker")
    fold_matches = config.get("fail_at_fold") in (None, config.get("current_fold"))
    if config.get("fail_at_epoch") == epoch and fold_matches and rank == 0 and marker and not os.path.exists(marker):
        import ray.train

        # wait until Train has registered the checkpoints reported so far: a crash is then
        # guaranteed to resume from the last one rather than racing the controller's poll
        ray.train.get_all_reported_checkpoints(timeout_s=120)
        Path(marker).write_text(f"killed at epoch {epoch}\n")
        log.warning("test hook: killing worker process %d at epoch %d", os.getpid(), epoch)
        os._exit(1)


def _maybe_hold(epoch: int, rank: int) -> None:
    """Test hook (environment, so it reaches the workers of a `ray job submit` job and of every Tune
    trial): at the start of epoch ``SER_RAY_TEST_HOLD_AT_EPOCH``, once Train has registered the
    checkpoints reported so far, write ``held-<pid>`` (holding the node id) into ``SER_RAY_TEST_HOLD_DIR``
    and wait there until that folder holds ``release``. A test then kills a node while every run is
    mid-training."""
    folder = os.environ.get("SER_RAY_TEST_HOLD_DIR")
    if not folder or rank != 0 or os.environ.get("SER_RAY_TEST_HOLD_AT_EPOCH") != str(epoch):
        return
    import ray
    import ray.train

    ray.train.get_all_reported_checkpoints(timeout_s=120)
    # the node id: a test kills the node a held run is on
    Path(folder, f"held-{os.getpid()}").write_text(f"{ray.get_runtime_context().get_node_id()}\n")
    deadline = time.monotonic() + 600
    while not Path(folder, "release").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


# -- driver side -----------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """What a training run produced."""

    best_checkpoint: str  # directory (local or s3://) in the save_model layout, chosen on val UA
    best_metrics: dict  # the reported metrics of that epoch
    history: list[dict]  # one dict per epoch, in order (resumed runs included once)
    path: str  # the Ray Train run directory
    labels: list[str]
    config: dict  # the TrainConfig used


def make_dataset(df: pd.DataFrame, labels: list[str], *, shuffle_seed: int | None = None):
    """Feature-cache rows -> a materialised Ray Dataset with ``features`` (tensor) and ``label`` (int64)."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    from ser_ray.features.pipeline import features_array

    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(df["emotion"]) - set(index))
    if unknown:
        raise ValueError(f"rows with labels {unknown} are not in the label list {labels}; apply the label map first")
    if shuffle_seed is not None:  # one full shuffle up front; the loop adds a local shuffle per epoch
        df = df.sample(frac=1.0, random_state=shuffle_seed)
    table = pa.table({
        "features": ArrowTensorArray.from_numpy(features_array(df)),
        "label": pa.array(df["emotion"].map(index).to_numpy(np.int64)),
    })
    # from_blocks computes the block's metadata here; from_arrow / from_pandas ask a 1-CPU task for it,
    # which inside a Tune trial (its own fraction of a CPU reserved) waited for ever once no node had
    # a whole CPU free (two trials on two 1-CPU nodes)
    return ray.data.from_blocks([table])


def usable_rows(df: pd.DataFrame, what: str) -> pd.DataFrame:
    """Rows without a feature-extraction error (logging how many were dropped)."""
    if "error" in df.columns:
        bad = df["error"].notna()
        if bad.any():
            log.warning("%s: dropping %d clip(s) whose features failed, e.g. %s", what, int(bad.sum()),
                        df.loc[bad, "error"].iloc[0])
            df = df[~bad]
    if len(df) == 0:
        raise ValueError(f"{what}: no usable clips")
    return df


def loop_config(config: TrainConfig, labels: list[str], feature_config: FeatureConfig,
                train_df: pd.DataFrame | None) -> dict:
    """The ``train_loop_config`` of a run: everything the worker needs, as plain values (``train_df``
    None: no class counts, as for a multi-fold run, whose folds carry their own)."""
    out = {"train": config_to_plain(config), "labels": list(labels), "feature_config": feature_config.to_dict()}
    if train_df is not None:
        out["class_counts"] = class_counts(train_df, labels)
    return out


def class_counts(train_df: pd.DataFrame, labels: list[str]) -> dict[str, int]:
    """Training clips per label (the worker's class weights come from these)."""
    counts = train_df["emotion"].value_counts()
    return {label: int(counts.get(label, 0)) for label in labels}


def make_trainer(loop_cfg: dict, datasets: dict, config: TrainConfig, *, name: str, storage_path: str,
                 callbacks: list | None = None, keep_latest_only: bool = False):
    """The ``TorchTrainer`` for one run (Tune wraps this with its own callbacks)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from ser_ray.session import check_fits

    # Ray Train's controller polls its workers every 2 s by default, and a run's start and end each wait
    # for polls: 0.25 s took a one-epoch EmoDB fit from 21.8 to 17.1 s here, and the fixed cost per fit
    # in benchmarks/train_overhead.py from 22.7 to 11.0 s. The driver's value reaches the controller;
    # set the variable to keep another.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    use_gpu = config.use_gpu
    if use_gpu is None:  # auto: a GPU when the cluster has one
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    check_fits({"CPU": config.cpus_per_worker, "GPU": config.gpus_per_worker if use_gpu else 0},
               config.num_workers, what=f"training {name}",
               settings="cpus_per_worker / gpus_per_worker / num_workers (e.g. --set cpus_per_worker=1)")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=bool(use_gpu),
            resources_per_worker={"CPU": config.cpus_per_worker,
                                  **({"GPU": config.gpus_per_worker} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            # the best two by val UA (the run's result); a multi-fold run keeps each fold's best itself and
            # its checkpoints only resume it, so the latest is the one to keep
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1) if keep_latest_only else
            ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_ua", checkpoint_score_order="max"),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # one worker reads whole datasets: no streaming split, so no SplitCoordinator actor (a process
        # start, ~1 s of CPU) per dataset per run; several workers split train and val between them
        dataset_config=ray.train.DataConfig(datasets_to_split="all" if config.num_workers > 1 else []),
    )


def fit(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    labels: list[str],
    feature_config: FeatureConfig,
    config: TrainConfig,
    *,
    name: str | None = None,
    storage_path: str | None = None,
    extra_loop_config: dict | None = None,
    copies: pd.DataFrame | None = None,
) -> TrainResult:
    """Train ``config.family`` on feature-cache rows with Ray Train; select the best epoch on ``val_df``.

    Classical families (``logreg``, ``svm``) are fitted in this process instead (``train.classical``),
    with the speed-perturbed ``copies`` of their training clips when given.

    ``train_df``/``val_df`` are feature-cache rows (manifest columns + ``features``), already label
    mapped. Rerunning with the same ``(storage_path, name)`` resumes that run.
    """
    from ser_ray.models.classical import is_classical

    name = name or config.name or f"{config.family}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    storage_path = storage_root(storage_path or config.storage_path or "~/ser-ray-results")
    if is_classical(config.family):  # seconds of scikit-learn: no worker group (see train.classical)
        from ser_ray.train.classical import fit_classical

        return fit_classical(train_df, val_df, labels, feature_config, config,
                             run_dir=f"{storage_path.rstrip('/')}/{name}", copies=copies)
    if copies is not None:
        raise ValueError(f"{config.family}: speed-perturbed copies (data.speed_perturb) are read by the classical "
                         "families only")
    train_df = usable_rows(train_df, "training set")
    val_df = usable_rows(val_df, "validation set")
    datasets = {
        "train": make_dataset(train_df, labels, shuffle_seed=config.seed),
        "val": make_dataset(val_df, labels),
    }
    loop_cfg = {**loop_config(config, labels, feature_config, train_df), **(extra_loop_config or {})}
    log.info("training %s on %d clips (val %d), %d labels, up to %d epochs -> %s/%s",
             config.family, len(train_df), len(val_df), len(labels), config.epochs, storage_path, name)
    result = make_trainer(loop_cfg, datasets, config, name=name, storage_path=storage_path).fit()
    return train_result(result, labels, config)


def fit_folds(
    folds: dict[int, tuple[pd.DataFrame, pd.DataFrame]],
    labels: list[str],
    feature_config: FeatureConfig,
    config: TrainConfig,
    *,
    name: str,
    storage_path: str,
    extra_loop_config: dict | None = None,
) -> dict[int, TrainResult]:
    """``fit`` for several cross-validation folds (fold -> ``(train_df, val_df)``) in ONE Ray Train run.

    The worker group trains the folds one after another, each exactly as ``fit`` would (same seed,
    data order, threads and best-epoch rule), so the group's start-up (controller, worker processes,
    torch imports, datasets: ~10 s) is paid once per run instead of once per fold. Each fold's best
    model goes to ``<run>/fold_<i>/model`` with ``result.json``; rerunning with the same name resumes
    the run (finished folds are skipped, the current one resumes from its last checkpoint).
    """
    from ser_ray import storage

    storage_path = storage_root(storage_path)
    run_dir = storage.join(storage_path, name)
    datasets, specs = {}, []
    for f, (train_df, val_df) in folds.items():
        train_df = usable_rows(train_df, f"fold {f} training set")
        val_df = usable_rows(val_df, f"fold {f} validation set")
        datasets[f"train_{f}"] = make_dataset(train_df, labels, shuffle_seed=config.seed)
        datasets[f"val_{f}"] = make_dataset(val_df, labels)
        specs.append({"fold": int(f), "class_counts": class_counts(train_df, labels),
                      "out": storage.join(run_dir, f"fold_{f}")})
    loop_cfg = {**loop_config(config, labels, feature_config, None), **(extra_loop_config or {}), "folds": specs}
    log.info("training %s on folds %s in one worker group, up to %d epochs each -> %s", config.family,
             [spec["fold"] for spec in specs], config.epochs, run_dir)
    result = _finished(make_trainer(loop_cfg, datasets, config, name=name, storage_path=storage_path,
                                    keep_latest_only=True).fit())
    out = {}
    for spec in specs:
        uri = storage.join(spec["out"], FOLD_RESULT)
        if not storage.exists(uri):
            raise RuntimeError(f"training run {result.path}: fold {spec['fold']} wrote no {FOLD_RESULT}")
        fold_result = json.loads(storage.read_bytes(uri))
        out[spec["fold"]] = TrainResult(best_checkpoint=storage.join(spec["out"], "model"),
                                        best_metrics=fold_result["best_metrics"], history=fold_result["history"],
                                        path=spec["out"], labels=list(labels), config=config_to_plain(config))
    return out


def storage_root(storage_path: str) -> str:
    """Ray Train's ``storage_path``: a URI as given, a local path absolute (``~`` expanded)."""
    return storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())


def _finished(result):
    """``result`` of a run that ended without an error; its error raised otherwise."""
    if result.error is not None:
        raise RuntimeError(f"training run {result.path} failed: {result.error}") from result.error
    return result


def epoch_rank(metrics: dict) -> tuple[float, float]:
    """How epochs rank when the best one is chosen: validation UA, then the lower validation loss."""
    return metrics["val_ua"], -metrics["val_loss"]


def train_result(result, labels: list[str], config: TrainConfig) -> TrainResult:
    """A :class:`TrainResult` from a finished ``ray.train.Result`` (best epoch by ``epoch_rank``)."""
    _finished(result)
    candidates = list(result.best_checkpoints or [])
    if not candidates:
        raise RuntimeError(f"training run {result.path} reported no checkpoint")
    best_ckpt, best_metrics = max(candidates, key=lambda cm: epoch_rank(cm[1]))
    history = _history(result)
    return TrainResult(
        best_checkpoint=checkpoint_uri(best_ckpt),
        best_metrics=dict(best_metrics),
        history=history,
        path=result.path,
        labels=list(labels),
        config=config_to_plain(config),
    )


def checkpoint_uri(checkpoint) -> str:
    """A checkpoint's directory as a local path or ``s3://`` URI (what ``load_model`` reads)."""
    fs = getattr(checkpoint, "filesystem", None)
    if fs is not None and fs.type_name == "s3" and not checkpoint.path.startswith("s3://"):
        return "s3://" + checkpoint.path
    return checkpoint.path


def _history(result) -> list[dict]:
    """Per-epoch metrics from the latest checkpoint's state (one entry per epoch even after restarts)."""
    latest = result.checkpoint
    if latest is not None:
        with latest.as_directory() as d:
            path = os.path.join(d, TRAIN_STATE)
            if os.path.exists(path):
                return list(torch.load(path, map_location="cpu", weights_only=False)["state"]["history"])
    frame = result.metrics_dataframe
    if frame is None:
        return []
    return [{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            for row in frame.to_dict("records")]
