"""Manifest -> Ray Data (or local processes) -> feature cache (Parquet), keyed by feature config + manifest.

One row per manifest row: every manifest column, ``features`` (float32, ``config.shape``) and
``error`` (null when ok). A clip that cannot be read or decoded becomes a row with ``error`` set and
all-zero features, so one bad file never stops a run. ``cache.json`` is written last; its presence
is what marks a cache as complete, and a second ``prepare`` with the same inputs reuses it.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import math
import os
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

import ser_ray
from ser_ray import storage
from ser_ray.audio.decode import decode_audio
from ser_ray.features.config import FeatureConfig

log = logging.getLogger(__name__)

CACHE_JSON = "cache.json"
# Bump when the way rows are produced changes, so old caches are not reused by mistake.
PIPELINE_VERSION = 2  # 2: soxr resampling, rate and sample checks
ERROR_SAMPLE = 20  # error messages kept in cache.json / CacheInfo
# How the clips are spread over CPUs: ``local`` worker processes on this machine (no Ray), Ray Data
# ``tasks`` or an autoscaling Ray Data ``actors`` pool; ``auto`` is ``local`` when no Ray is running
# or given to join (starting and stopping one costs ~4 s, a third of a 1,500-clip corpus), else ``tasks``.
STRATEGIES = ("auto", "local", "tasks", "actors")


@dataclasses.dataclass
class CacheInfo:
    """Where a feature cache lives and what is in it."""

    path: str  # cache_root/<key>, a local path or s3:// URI
    key: str
    n_ok: int
    n_error: int
    errors: list[tuple[str, str]]  # (path, message), a sample of at most ERROR_SAMPLE
    reused: bool
    seconds: float
    config: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)


# -- the batch function run by Ray Data ------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _extractor(config: FeatureConfig):
    # Ray reuses worker processes, so each worker builds its extractor (mel filterbank) once.
    from ser_ray.features.extractor import FeatureExtractor

    return FeatureExtractor(config)


def extract_batch(batch: pd.DataFrame, config: FeatureConfig) -> pa.Table:
    """Manifest rows -> the same rows plus ``features`` and ``error`` (read, decode, window, extract).

    Reading and decoding are per clip; feature extraction is one batched call over the batch.
    """
    from ray.data.extensions import ArrowTensorArray

    extractor = _extractor(config)
    waves = np.zeros((len(batch), config.num_samples), dtype=np.float32)
    errors: list[str | None] = [None] * len(batch)
    for i, uri in enumerate(batch["path"]):
        try:
            audio, sr = decode_audio(storage.read_bytes(uri), uri)
            waves[i] = extractor.prepare_wave(audio, sr)
        except FileNotFoundError:
            errors[i] = f"{uri}: file not found"
        except Exception as exc:  # any bad input becomes an error row, never a failed run
            errors[i] = str(exc) if str(uri) in str(exc) else f"{uri}: {type(exc).__name__}: {exc}"
    features = extractor(waves)
    features[[e is not None for e in errors]] = 0.0
    table = pa.Table.from_pandas(batch.reset_index(drop=True), preserve_index=False)
    table = table.append_column("features", ArrowTensorArray.from_numpy(features))
    return table.append_column("error", pa.array(errors, type=pa.string()))


class ExtractBatch:
    """The actor-pool form of :func:`extract_batch`: one extractor per actor."""

    def __init__(self, config: FeatureConfig):
        self.config = config
        _extractor(config)

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        return extract_batch(batch, self.config)


# -- the local form: worker processes on this machine, no Ray ------------------------------------


def _start_local_worker(config: FeatureConfig) -> None:
    import torch

    torch.set_num_threads(1)  # one process per CPU, as Ray runs its workers (OMP_NUM_THREADS=1)
    _extractor(config)


def _extract_block(block: pd.DataFrame, config: FeatureConfig, batch_size: int, uri: str) -> int:
    """One block of manifest rows -> one Parquet file at ``uri`` (run in a worker process)."""
    import pyarrow.parquet as pq

    tables = [extract_batch(block.iloc[i:i + batch_size], config) for i in range(0, len(block), batch_size)]
    fs, path = storage.filesystem_and_path(uri)
    pq.write_table(pa.concat_tables(tables), path, filesystem=fs)
    return len(block)


def _local_cpus() -> int:
    """CPUs this process may use, as a local Ray would count them: a container's CPU quota (cgroups),
    not the host's cores, which ``os.cpu_count`` reports."""
    try:
        from ray._private.utils import get_num_cpus  # the count `ray start` / `ray.init` use

        return max(1, int(get_num_cpus()))
    except Exception:  # a Ray without it: the affinity mask, which ignores quotas
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def fork_is_safe(manifest: pd.DataFrame | None = None, cache_dir: str = "") -> bool:
    """Whether worker processes can be forked from this one: not after torch (its OpenMP pool can
    deadlock a forked child) or Ray (its threads) have started here, and not with S3 in or out (the
    AWS SDK, started here by the cache lookup, is not fork-safe). Otherwise they are spawned, which
    re-imports the caller's main module: a script then needs ``if __name__ == "__main__":``, as for
    any multiprocessing or PyTorch ``DataLoader`` workers (``ser-ray prepare`` has it)."""
    import sys

    ray = sys.modules.get("ray")
    s3 = storage.is_s3(cache_dir) or (manifest is not None and any(storage.is_s3(str(p)) for p in manifest["path"]))
    return (os.name == "posix" and "torch" not in sys.modules and not s3
            and not (ray is not None and ray.is_initialized()))


def _write_local(manifest: pd.DataFrame, cache_dir: str, config: FeatureConfig, batch_size: int,
                 progress: bool, fork: bool) -> None:
    """The cache's Parquet files from a pool of worker processes, one per CPU.

    Blocks are small enough (8 per worker, at least one batch) that the last ones do not leave CPUs
    idle, and at most 1,024 rows so a large corpus is not thousands of tiny files.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    workers = _local_cpus()
    rows = min(1024, max(batch_size, math.ceil(len(manifest) / (8 * workers))))
    starts = range(0, len(manifest), rows)
    fs, path = storage.filesystem_and_path(cache_dir)
    fs.create_dir(path, recursive=True)
    log.info("extracting %s features for %d clips into %s (%d worker processes, %d blocks of <= %d rows, batch %d)",
             config.kind, len(manifest), cache_dir, min(workers, len(starts)), len(starts), rows, batch_size)
    context = multiprocessing.get_context("fork" if fork else "spawn")
    with ProcessPoolExecutor(min(workers, len(starts)), mp_context=context,
                             initializer=_start_local_worker, initargs=(config,)) as pool:
        futures = [pool.submit(_extract_block, manifest.iloc[a:a + rows], config, batch_size,
                               storage.join(cache_dir, f"part-{i:05d}.parquet"))
                   for i, a in enumerate(starts)]
        with tqdm(total=len(manifest), unit="clip", desc="prepare", disable=not progress) as bar:
            for future in as_completed(futures):
                bar.update(future.result())


# -- cache key and layout --------------------------------------------------------------------------


def _file_sizes(paths: pd.Series) -> list[int]:
    """Local file sizes (cheap, catches replaced files); S3 objects are keyed by URI only."""
    sizes = []
    for p in paths:
        try:
            sizes.append(-1 if storage.is_s3(p) else storage.size(p))
        except OSError:
            sizes.append(-2)
    return sizes


def cache_key(manifest: pd.DataFrame, config: FeatureConfig) -> str:
    """sha256 over the pipeline version, the feature config, every manifest cell and local file sizes."""
    h = hashlib.sha256()
    h.update(f"ser-ray-features-v{PIPELINE_VERSION}\n{config.key()}\n".encode())
    h.update(manifest.to_csv(index=False).encode())
    h.update(json.dumps(_file_sizes(manifest["path"])).encode())
    return h.hexdigest()[:16]


def _read_cache_json(cache_dir: str) -> dict | None:
    uri = storage.join(cache_dir, CACHE_JSON)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def _info_from_json(cache_dir: str, meta: dict, reused: bool, seconds: float) -> CacheInfo:
    return CacheInfo(
        path=cache_dir,
        key=meta["key"],
        n_ok=meta["n_ok"],
        n_error=meta["n_error"],
        errors=[tuple(e) for e in meta["errors"]],
        reused=reused,
        seconds=seconds,
        config=FeatureConfig.from_dict(meta["feature_config"]),
    )


# -- prepare ---------------------------------------------------------------------------------------


def prepare(
    manifest: pd.DataFrame,
    cache_root: str,
    config: FeatureConfig = FeatureConfig(),
    *,
    batch_size: int = 64,
    num_cpus_per_task: float = 1,
    strategy: str = "auto",
    progress: bool = True,
) -> CacheInfo:
    """Extract features for every manifest row into ``cache_root/<key>/`` and return its info.

    Reuses a complete cache with the same key (``reused=True``); removes and redoes a cache dir
    left without ``cache.json`` by a crashed run. ``strategy`` (see ``STRATEGIES``): ``local``
    worker processes, Ray Data ``tasks`` (measured faster than actors on CPU, see
    benchmarks/features.py) or ``actors``; ``auto`` takes Ray Data when this process is connected to
    a Ray or has one to join (``RAY_ADDRESS``, ``ray job submit``), else ``local``. Every strategy
    writes the same rows. (``auto`` also needs workers to be forkable, see ``fork_is_safe``;
    ``ser-ray prepare`` takes ``local`` whenever no Ray is running or given.)
    """
    if "path" not in manifest.columns:
        raise ValueError("manifest has no 'path' column; build it with `ser-ray manifest`")
    if len(manifest) == 0:
        raise ValueError("manifest is empty: nothing to prepare")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    from ser_ray.session import ray_in_use

    start = time.perf_counter()
    key = cache_key(manifest, config)
    cache_dir = storage.join(cache_root, key)
    forkable = fork_is_safe(manifest, cache_dir)
    if strategy == "auto":
        # forking needs no main-module guard from the caller; where it is unsafe, start Ray as before
        strategy = "local" if not ray_in_use() and forkable else "tasks"

    meta = _read_cache_json(cache_dir)
    if meta is not None:
        log.info("feature cache %s is complete (%d ok, %d errors): reusing it",
                 cache_dir, meta["n_ok"], meta["n_error"])
        return _info_from_json(cache_dir, meta, reused=True, seconds=time.perf_counter() - start)
    if storage.exists(cache_dir):
        log.warning("%s has no %s (an interrupted run): removing it and starting again",
                    cache_dir, CACHE_JSON)
        storage.remove_tree(cache_dir)

    manifest = manifest.reset_index(drop=True)
    if strategy == "local":
        _write_local(manifest, cache_dir, config, batch_size, progress, fork=forkable)
    else:
        _write_with_ray_data(manifest, cache_dir, config, batch_size, num_cpus_per_task, strategy, progress)

    # Count from the written files (two small columns), so nothing is held in driver memory.
    status = _read_columns(cache_dir, ["path", "error"])
    failed = status[status["error"].notna()]
    seconds = time.perf_counter() - start
    meta = {
        "key": key,
        "feature_config": config.to_dict(),
        "n_rows": len(status),
        "n_ok": int(len(status) - len(failed)),
        "n_error": int(len(failed)),
        "errors": [[p, e] for p, e in failed.head(ERROR_SAMPLE).itertuples(index=False)],
        "columns": list(manifest.columns) + ["features", "error"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "ser_ray_version": ser_ray.__version__,
        "pipeline_version": PIPELINE_VERSION,
        "strategy": strategy,
    }
    if meta["n_rows"] != len(manifest):
        raise RuntimeError(f"{cache_dir}: wrote {meta['n_rows']} rows for {len(manifest)} manifest rows")
    storage.write_bytes(storage.join(cache_dir, CACHE_JSON), json.dumps(meta, indent=2).encode())

    for p, e in meta["errors"]:
        log.warning("skipped %s", e)
    log.info("prepared %d clips (%d ok, %d errors) in %.1f s: %.1f clips/s -> %s",
             len(manifest), meta["n_ok"], meta["n_error"], seconds, len(manifest) / seconds, cache_dir)
    return _info_from_json(cache_dir, meta, reused=False, seconds=seconds)


def _write_with_ray_data(manifest: pd.DataFrame, cache_dir: str, config: FeatureConfig, batch_size: int,
                         num_cpus_per_task: float, strategy: str, progress: bool) -> None:
    """The cache's Parquet files from Ray Data: blocks spread over the cluster's CPUs (and nodes)."""
    import ray
    from ray.data import DataContext

    from ser_ray.session import ensure

    ensure()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if not storage.is_s3(cache_dir) and nodes > 1:
        log.warning("%s is a local path on a %d-node cluster: each node writes its own part; "
                    "use an s3:// cache root", cache_dir, nodes)
    # ~200 clips per block keeps blocks small (streaming), and >= 2 blocks per CPU keeps CPUs busy.
    num_blocks = min(len(manifest), max(2 * cpus, math.ceil(len(manifest) / 200)))
    bounds = np.linspace(0, len(manifest), num_blocks + 1).astype(int)
    # One DataFrame per block (from_pandas's override_num_blocks breaks on DataFrames in 2.60).
    ds = ray.data.from_pandas([manifest.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    # Ray Data bundles blocks until a task has batch_size rows: a batch larger than a block would put
    # several blocks in one task and leave CPUs (and nodes) idle on a small corpus
    batch_size = max(1, min(batch_size, math.ceil(len(manifest) / num_blocks)))
    common = dict(batch_size=batch_size, batch_format="pandas", num_cpus=num_cpus_per_task)
    if strategy == "actors":
        # Autoscaling pool: leaves a CPU free for the write tasks when the cluster is small.
        ds = ds.map_batches(
            ExtractBatch,
            fn_constructor_kwargs={"config": config},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(cpus // num_cpus_per_task))),
            **common,
        )
    else:
        ds = ds.map_batches(extract_batch, fn_kwargs={"config": config}, **common)

    fs, fs_path = storage.filesystem_and_path(cache_dir)
    log.info("extracting %s features for %d clips into %s (%d blocks, batch %d, %s)",
             config.kind, len(manifest), cache_dir, num_blocks, batch_size, strategy)
    context = DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, progress
    try:
        ds.write_parquet(fs_path, filesystem=fs)
    finally:
        context.enable_progress_bars = bars


# -- reading a cache -------------------------------------------------------------------------------


def _cache_dir(path_or_info: str | CacheInfo) -> str:
    return path_or_info.path if isinstance(path_or_info, CacheInfo) else str(path_or_info)


def _check_complete(cache_dir: str) -> dict:
    meta = _read_cache_json(cache_dir)
    if meta is None:
        raise FileNotFoundError(
            f"{cache_dir}: not a complete feature cache (no {CACHE_JSON}); run `ser-ray prepare`"
        )
    return meta


def _read_columns(cache_dir: str, columns: list[str] | None = None) -> pd.DataFrame:
    import pyarrow.dataset as pads

    if columns is None or "features" in columns:
        import ray.data.extensions  # noqa: F401  registers the tensor extension type for Parquet

    fs, path = storage.filesystem_and_path(cache_dir)
    files = sorted(
        f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if f.type == pafs.FileType.File and f.path.endswith(".parquet")
    )
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    table = dataset.to_table(columns=columns)
    if "features" not in table.column_names:
        return table.to_pandas()
    features = table.column("features").combine_chunks()
    frame = table.drop(["features"]).to_pandas()
    frame["features"] = list(features.to_numpy()) if len(frame) else []
    return frame[table.column_names]


def load_cache(path_or_info: str | CacheInfo):
    """A complete cache as a ``ray.data.Dataset`` (streamed; ``features`` is a tensor column)."""
    import ray

    cache_dir = _cache_dir(path_or_info)
    _check_complete(cache_dir)
    fs, path = storage.filesystem_and_path(cache_dir)
    return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])


def load_cache_pandas(path_or_info: str | CacheInfo, columns: list[str] | None = None) -> pd.DataFrame:
    """A complete cache as a DataFrame (no Ray needed); ``features`` holds ``config.shape`` arrays.

    Rows are sorted by ``path`` (Ray writes files in completion order), so the order is stable.
    """
    cache_dir = _cache_dir(path_or_info)
    _check_complete(cache_dir)
    frame = _read_columns(cache_dir, columns)
    if "path" in frame.columns:
        frame = frame.sort_values("path", kind="stable", ignore_index=True)
    return frame


def features_array(frame: pd.DataFrame) -> np.ndarray:
    """The ``features`` column stacked into one float32 array ``[N, channels, frames]``."""
    if len(frame) == 0:
        raise ValueError("no rows: cannot stack features of an empty frame")
    return np.stack(frame["features"].to_numpy()).astype(np.float32, copy=False)
