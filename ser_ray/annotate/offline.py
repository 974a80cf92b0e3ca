"""Offline annotation of an archive with Ray Data: an actor pool, one bundle per actor.

list the archive -> skip what the output already holds -> ``map_batches(AnnotateActor)`` -> the
driver commits each batch of results through ``ResultWriter`` as it arrives. A run killed at any
point loses at most the batch in flight; rerunning resumes.

A file that kills its worker (a decoder crash, the OOM killer) must not stall the run: before each
file the actor counts an attempt in ``OUTPUT/_attempts/<run>/``; Ray restarts the actor and retries
the call, and once a file has used ``max_attempts`` the actor answers with a ``worker_crashed`` error
row instead of reading it again. Ray's own retries are finite as well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid

import numpy as np

from ser_ray import storage
from ser_ray.annotate.core import AnnotateConfig, annotate_file, file_row
from ser_ray.annotate.listing import list_archive
from ser_ray.annotate.writer import ResultWriter
from ser_ray.artefacts import ANNOTATION_ATTEMPTS

log = logging.getLogger(__name__)


class Attempts:
    """How many times each file of one run has been started: ``<journal>/<sha1 of uri>``, a count.

    Written before the file is read, so the count survives a worker that dies while reading it.
    """

    def __init__(self, journal_uri: str):
        self.journal_uri = journal_uri

    def _uri(self, uri: str) -> str:
        return storage.join(self.journal_uri, hashlib.sha1(uri.encode()).hexdigest())

    def start(self, uri: str) -> int:
        """Count one more attempt at ``uri``; returns the attempts so far, this one included."""
        entry = self._uri(uri)
        try:
            count = int(storage.read_bytes(entry).decode().split()[0])
        except (FileNotFoundError, OSError, ValueError, IndexError):
            count = 0
        storage.write_bytes(entry, f"{count + 1} pid={os.getpid()}\n".encode())
        return count + 1

    def clear(self) -> None:
        fs, path = storage.filesystem_and_path(self.journal_uri)
        try:
            fs.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass


class AnnotateActor:
    """Loads the bundle once; each call annotates a batch of uris with ``annotate_file``."""

    def __init__(self, bundle_uri: str, config: dict, device: str = "cpu", torch_threads: int = 1,
                 journal_uri: str | None = None, max_attempts: int = 2):
        import torch

        from ser_ray.ensemble.bundle import load_bundle

        torch.set_num_threads(max(1, torch_threads))  # one core per actor: the pool gives parallelism
        self.bundle = load_bundle(bundle_uri, device=device)
        self.config = AnnotateConfig(**config).with_labels(self.bundle.labels)
        self.bundle.optimise_for_inference(self.config.backend)
        self.attempts = Attempts(journal_uri) if journal_uri else None
        self.max_attempts = max_attempts

    def __call__(self, batch: dict) -> dict:
        files, segments = [], []
        for uri in batch["uri"]:
            uri = str(uri)
            attempt = self.attempts.start(uri) if self.attempts else 1
            if attempt > self.max_attempts:
                name = os.path.basename(uri.rstrip("/")) or uri
                row, segs = file_row(uri, self.bundle.labels, status="error", error_code="worker_crashed",
                                     error=f"{name}: gave up after {self.max_attempts} attempts; the worker "
                                           "reading it died each time (crash or out of memory)"), []
            else:
                row, segs = annotate_file(uri, self.bundle.predict_proba, self.config)
            files.append(json.dumps(row))
            segments.append(json.dumps(segs))
        return {"uri": batch["uri"], "file_row": np.array(files, dtype=object), "segments": np.array(segments, dtype=object)}


def annotate_archive(
    input_uri: str,
    output_uri: str,
    bundle_uri: str,
    config: AnnotateConfig = AnnotateConfig(),
    *,
    batch_files: int = 16,
    num_actors: int | None = None,
    fmt: str = "parquet",
    device: str = "cpu",
    progress: bool = True,
    max_attempts: int = 2,
) -> dict:
    """Annotate every file under ``input_uri`` into ``output_uri``; returns a summary dict.

    Files already committed in ``output_uri`` are skipped. ``num_actors`` defaults to the cluster's
    CPUs (with a GPU ``device``, one actor per GPU). A file whose worker dies ``max_attempts`` times
    gets an error row. Raises ``OutputBusy`` when another run is writing to ``output_uri``.
    """
    from ser_ray.annotate.core import resolve_normalisation
    from ser_ray.ensemble.bundle import read_bundle_json

    # settle normalise_by before any work: a mode the bundle was not trained for is refused here
    config = resolve_normalisation(config, read_bundle_json(bundle_uri).get("normalise_by", "none"))
    with ResultWriter(output_uri, fmt) as writer:
        return _annotate_archive(input_uri, output_uri, bundle_uri, config, writer, batch_files=batch_files,
                                 num_actors=num_actors, device=device, progress=progress, max_attempts=max_attempts)


LOST_WORKER_RESUMES = 3  # rounds started again after losing workers (a node died) before giving up


def _lost_worker_errors() -> tuple:
    """What Ray raises when workers disappear (their node died, an actor cannot come back): the files
    not yet committed can be done again elsewhere. An exception inside annotation code is not one."""
    from ray import exceptions

    return (exceptions.RayActorError, exceptions.NodeDiedError, exceptions.ObjectLostError,
            exceptions.WorkerCrashedError)


def _annotate_archive(input_uri, output_uri, bundle_uri, config, writer, *, batch_files, num_actors, device,
                      progress, max_attempts) -> dict:
    import ray

    uris = list_archive(input_uri, output_uri)
    done = writer.done_uris()
    todo = [u for u in uris if u not in done]
    summary = {"n_files": len(uris), "normalise_by": config.normalise_by,
               "n_skipped": len(uris) - len(todo), "n_processed": 0, "n_ok": 0,
               "n_error": 0, "audio_s": 0.0, "wall_s": 0.0, "batches": []}
    log.info("%s: %d files, %d already annotated, %d to do", input_uri, len(uris), summary["n_skipped"], len(todo))
    if not todo:
        return summary

    from ser_ray.session import ensure

    ensure()
    attempts = Attempts(storage.join(output_uri, ANNOTATION_ATTEMPTS, uuid.uuid4().hex[:12]))
    bar = _progress(len(uris), summary["n_skipped"], progress)
    start = time.perf_counter()
    for resumes in range(LOST_WORKER_RESUMES + 1):
        try:
            _annotate_round(todo, bundle_uri, config, writer, summary, bar, start, batch_files=batch_files,
                            num_actors=num_actors, device=device, attempts=attempts, max_attempts=max_attempts)
            break
        except _lost_worker_errors() as exc:
            # committed batches stay; the pool is rebuilt on what is left of the cluster
            done = writer.done_uris()
            todo = [u for u in uris if u not in done]
            if resumes == LOST_WORKER_RESUMES or not todo:
                raise
            log.warning("lost workers (%s: %s); resuming the %d file(s) not yet written on the nodes left",
                        type(exc).__name__, str(exc).splitlines()[0][:200], len(todo))
            num_actors = None if num_actors is None else min(num_actors, _actor_room(ray, device))
    if bar is not None:
        bar.close()
    attempts.clear()
    log.info(
        "annotated %d files (%d errors), %.2f h of audio in %.0f s (%.0fx real time) -> %s",
        summary["n_processed"], summary["n_error"], summary["audio_s"] / 3600, summary["wall_s"],
        summary["audio_s"] / max(summary["wall_s"], 1e-9), output_uri,
    )
    return summary


def _actor_room(ray, device) -> int:
    """Actors the alive nodes have room for: one per CPU, or per GPU with a CUDA ``device``."""
    resources = ray.cluster_resources()  # alive nodes only
    return max(1, int(resources.get("GPU", 1)) if str(device).startswith("cuda") else int(resources.get("CPU", 1)))


def _annotate_round(todo, bundle_uri, config, writer, summary, bar, start, *, batch_files, num_actors, device,
                    attempts, max_attempts) -> None:
    """One pass of the actor pool over ``todo``, committing each batch as it arrives."""
    import ray
    from ray.data import ActorPoolStrategy

    gpu = str(device).startswith("cuda")
    num_actors = max(1, min(num_actors or _actor_room(ray, device), len(todo)))
    ds = ray.data.from_items([{"uri": u} for u in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        AnnotateActor,
        batch_size=1,  # one file per call: long and short files balance across the pool
        compute=ActorPoolStrategy(size=num_actors),
        fn_constructor_kwargs={"bundle_uri": bundle_uri, "config": dataclasses.asdict(config), "device": device,
                               "journal_uri": attempts.journal_uri, "max_attempts": max_attempts},
        num_cpus=1,
        num_gpus=1 if gpu else 0,
        # Ray Data's default is to restart and retry forever; the attempt journal answers a file
        # on its (max_attempts + 1)-th call, so a few retries more than that always suffice
        max_restarts=-1,
        max_task_retries=max_attempts + 2,
    )
    for batch in ds.iter_batches(batch_size=batch_files, batch_format="numpy"):
        files = [json.loads(s) for s in batch["file_row"]]
        segments = [seg for s in batch["segments"] for seg in json.loads(s)]
        summary["batches"].append(writer.commit(files, segments))
        ok = [f for f in files if f["status"] == "ok"]
        summary["n_processed"] += len(files)
        summary["n_ok"] += len(ok)
        summary["n_error"] += len(files) - len(ok)
        summary["audio_s"] += sum(f["duration_s"] for f in ok)
        summary["wall_s"] = time.perf_counter() - start
        if bar is not None:
            bar.update(len(files))
            bar.set_postfix(
                audio_h=f"{summary['audio_s'] / 3600:.2f}",
                speed=f"{summary['audio_s'] / max(summary['wall_s'], 1e-9):.0f}x",
                errors=summary["n_error"],
            )


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="file", desc="annotate")
