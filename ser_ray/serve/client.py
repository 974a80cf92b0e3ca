"""Annotate an archive through a running endpoint: the same tables as offline annotation, resumable.

list the archive -> skip URIs the output already holds -> POST batches of URIs to ``/annotate``
(several in flight) -> commit each answer through ``ResultWriter`` as it arrives. The server reads the
files itself, so the URIs must be readable there: paths on a filesystem both machines share, or
``s3://`` objects in a bucket the server allows.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx

from ser_ray.annotate.listing import list_archive
from ser_ray.annotate.writer import ResultWriter

log = logging.getLogger(__name__)


class EndpointError(RuntimeError):
    """The endpoint refused a batch (4xx) or kept failing; the message carries its answer."""


def annotate_via_endpoint(
    input_uri: str,
    output_uri: str,
    endpoint_url: str,
    *,
    batch_files: int = 8,
    concurrency: int = 4,
    progress: bool = True,
    fmt: str = "parquet",
    retries: int = 5,
    timeout_s: float = 600.0,
) -> dict:
    """Annotate every file under ``input_uri`` into ``output_uri`` via ``endpoint_url``/annotate.

    Returns a summary (``n_files``, ``n_skipped``, ``n_processed``, ``n_ok``, ``n_error``, ``audio_s``,
    ``wall_s``). Connection errors and 5xx answers are retried with exponential backoff up to
    ``retries`` times per batch; a 4xx answer (e.g. URIs outside the server's allowed roots) stops
    the run with the server's message. Batches committed before a failure stay committed: rerun to
    resume.
    """
    writer = ResultWriter(output_uri, fmt)
    uris = list_archive(input_uri, output_uri)
    done = writer.done_uris()
    todo = [u for u in uris if u not in done]
    summary = {"n_files": len(uris), "n_skipped": len(uris) - len(todo), "n_processed": 0, "n_ok": 0,
               "n_error": 0, "audio_s": 0.0, "wall_s": 0.0}
    log.info("%s: %d files, %d already annotated, %d to do via %s", input_uri, len(uris),
             summary["n_skipped"], len(todo), endpoint_url)
    if not todo:
        return summary

    url = endpoint_url.rstrip("/") + "/annotate"
    batches = [todo[i:i + batch_files] for i in range(0, len(todo), batch_files)]
    bar = _progress(len(uris), summary["n_skipped"], progress)
    start = time.perf_counter()
    with httpx.Client(timeout=timeout_s) as http, ThreadPoolExecutor(max(1, concurrency)) as pool:
        queue = iter(batches)
        running = set()
        try:
            while True:
                while len(running) < concurrency and (batch := next(queue, None)) is not None:
                    running.add(pool.submit(_post, http, url, batch, retries))
                if not running:
                    break
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    answer = future.result()  # raises EndpointError: stop, keep what is committed
                    files, segments = answer["files"], answer["segments"]
                    writer.commit(files, segments)  # in the driver thread only: one writer
                    ok = [f for f in files if f.get("status") == "ok"]
                    summary["n_processed"] += len(files)
                    summary["n_ok"] += len(ok)
                    summary["n_error"] += len(files) - len(ok)
                    summary["audio_s"] += sum(f.get("duration_s") or 0.0 for f in ok)
                    summary["wall_s"] = time.perf_counter() - start
                    if bar is not None:
                        bar.update(len(files))
                        bar.set_postfix(audio_h=f"{summary['audio_s'] / 3600:.2f}",
                                        speed=f"{summary['audio_s'] / max(summary['wall_s'], 1e-9):.0f}x",
                                        errors=summary["n_error"])
        finally:
            for future in running:
                future.cancel()
            if bar is not None:
                bar.close()
    log.info("annotated %d files (%d errors), %.2f h of audio in %.0f s (%.0fx real time) via %s -> %s",
             summary["n_processed"], summary["n_error"], summary["audio_s"] / 3600, summary["wall_s"],
             summary["audio_s"] / max(summary["wall_s"], 1e-9), endpoint_url, output_uri)
    return summary


def _post(http: httpx.Client, url: str, uris: list[str], retries: int) -> dict:
    """POST one batch; retry connection errors and 5xx with backoff (1, 2, 4, ... s, at most 30 s)."""
    for attempt in range(retries + 1):
        try:
            response = http.post(url, json={"uris": uris})
        except httpx.TransportError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 200:
                answer = response.json()
                if len(answer.get("files", [])) != len(uris):
                    raise EndpointError(f"{url}: sent {len(uris)} URIs, got {len(answer.get('files', []))} rows")
                return answer
            if response.status_code < 500:
                raise EndpointError(f"{url} refused a batch of {len(uris)} URIs "
                                    f"({response.status_code}): {response.text[:2000]}")
            problem = f"HTTP {response.status_code}: {response.text[:500]}"
        if attempt < retries:
            delay = min(30.0, 2.0 ** attempt)
            log.warning("%s failed (%s); retry %d/%d in %.0f s", url, problem, attempt + 1, retries, delay)
            time.sleep(delay)
    raise EndpointError(f"{url}: giving up after {retries + 1} attempts; last error: {problem}")


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="file", desc="annotate via endpoint")
