"""Annotate an archive through a running endpoint: the same tables as offline annotation, resumable.

list the archive -> skip URIs the output already holds -> POST batches of URIs to ``/annotate``
(several in flight) -> commit each answer through ``ResultWriter`` as it arrives. The server reads the
files itself, so the URIs must be readable there: paths on a filesystem both machines share, or
``s3://`` objects in a bucket the server allows.

Every URI gets one row: a URI the server refuses (outside its roots) gets an ``error`` row
(``error_code`` ``refused``) and the rest of its batch is sent again; a batch that times out is not
sent again while the server may still be computing it: its URIs get ``retry`` rows, which the next
run redoes. A file that did not fit in its request's window budget (``request_full``) is sent again
alone. Overload answers (429/503) are retried after the server's ``Retry-After``. A fatal error
stops the run at once: queued batches are cancelled and no retry waits are sat out.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx

from ser_ray.annotate.core import file_row
from ser_ray.annotate.listing import list_archive
from ser_ray.annotate.writer import ResultWriter
from ser_ray.errors import UserError
from ser_ray.auth import client_headers

log = logging.getLogger(__name__)


class EndpointError(UserError, RuntimeError):
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
    api_key: str | None = None,
) -> dict:
    """Annotate every file under ``input_uri`` into ``output_uri`` via ``endpoint_url``/annotate.

    Returns a summary (``n_files``, ``n_skipped``, ``n_processed``, ``n_ok``, ``n_error``, ``audio_s``,
    ``wall_s``). Connection errors and 5xx answers are retried with exponential backoff up to
    ``retries`` times per batch; other 4xx answers (a wrong API key, a malformed request) stop the run
    with the server's message. Batches committed before a failure stay committed: rerun to resume.
    ``api_key``: default from ``SER_RAY_API_KEY`` or the key file (see ``ser_ray.auth``).
    """
    with ResultWriter(output_uri, fmt) as writer:
        return _annotate(input_uri, output_uri, endpoint_url, writer, batch_files=batch_files,
                         concurrency=concurrency, progress=progress, retries=retries, timeout_s=timeout_s,
                         headers=client_headers(api_key))


def _annotate(input_uri, output_uri, endpoint_url, writer, *, batch_files, concurrency, progress, retries,
              timeout_s, headers) -> dict:
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
    stop = threading.Event()
    pool = ThreadPoolExecutor(max(1, concurrency))
    with httpx.Client(timeout=timeout_s, headers=headers) as http:
        queue = iter(batches)
        again: list[list[str]] = []  # files that did not fit in their request's window budget
        running: dict = {}
        try:
            while True:
                while len(running) < concurrency and (batch := (again.pop() if again else next(queue, None))):
                    running[pool.submit(_post, http, url, batch, retries, stop)] = batch
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    batch = running.pop(future)
                    answer = future.result()  # raises EndpointError: stop, keep what is committed
                    files, segments = answer["files"], answer["segments"]
                    if len(batch) > 1:  # sent again alone, where it fits (the server checks that)
                        full = [f["uri"] for f in files if f.get("error_code") == "request_full"]
                        again += [[uri] for uri in full]
                        files = [f for f in files if f.get("error_code") != "request_full"]
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
            stop.set()  # threads in a retry wait return now
            pool.shutdown(wait=False, cancel_futures=True)
            if bar is not None:
                bar.close()
    log.info("annotated %d files (%d errors), %.2f h of audio in %.0f s (%.0fx real time) via %s -> %s",
             summary["n_processed"], summary["n_error"], summary["audio_s"] / 3600, summary["wall_s"],
             summary["audio_s"] / max(summary["wall_s"], 1e-9), endpoint_url, output_uri)
    return summary


def _post(http: httpx.Client, url: str, uris: list[str], retries: int, stop: threading.Event) -> dict:
    """POST one batch -> ``{"files": [...], "segments": [...]}`` with one files row per URI.

    Connection errors and 5xx/429 are retried with backoff (1, 2, 4, ... s, at most 30 s, or the
    server's ``Retry-After``); refused URIs get error rows and the rest is sent again; a read timeout
    gives ``retry`` rows (sending again would double the server's work while it still computes).
    """
    rows: list[dict] = []
    problem = ""
    for attempt in range(retries + 1):
        if stop.is_set():
            raise EndpointError("stopped: another batch failed")
        wait_s = min(30.0, 2.0 ** attempt)
        try:
            response = http.post(url, json={"uris": uris})
        except httpx.TimeoutException as exc:
            log.warning("%s: no answer for %d URIs within the timeout (%s); they get retry rows", url, len(uris),
                        type(exc).__name__)
            return {"files": rows + [_row(u, "retry", "timeout", "the endpoint did not answer in time; "
                                                             "the next run tries again") for u in uris],
                    "segments": []}
        except httpx.TransportError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 200:
                answer = response.json()
                if len(answer.get("files", [])) != len(uris):
                    raise EndpointError(f"{url}: sent {len(uris)} URIs, got {len(answer.get('files', []))} rows")
                answer["files"] = rows + answer["files"]
                return answer
            refused = _refused(response)
            if refused:  # rows for the refused URIs; the others are sent again at once
                rows += [_row(u, "error", "refused", reason) for u, reason in refused.items()]
                uris = [u for u in uris if u not in refused]
                if not uris:
                    return {"files": rows, "segments": []}
                continue
            if response.status_code < 500 and response.status_code != 429:
                raise EndpointError(f"{url} refused a batch of {len(uris)} URIs "
                                    f"({response.status_code}): {response.text[:2000]}")
            problem = f"HTTP {response.status_code}: {response.text[:500]}"
            retry_after = response.headers.get("retry-after", "")
            if retry_after.isdigit():
                wait_s = min(300.0, max(wait_s, float(retry_after)))
        if attempt < retries:
            log.warning("%s failed (%s); retry %d/%d in %.0f s", url, problem, attempt + 1, retries, wait_s)
            if stop.wait(wait_s):
                raise EndpointError("stopped: another batch failed")
    raise EndpointError(f"{url}: giving up after {retries + 1} attempts; last error: {problem}")


def _refused(response: httpx.Response) -> dict[str, str]:
    """``{uri: reason}`` from a 400/403 answer that refused some of a batch's URIs, else ``{}``."""
    if response.status_code not in (400, 403):
        return {}
    try:
        refused = response.json().get("refused") or []
    except ValueError:
        return {}
    return {str(r["uri"]): str(r.get("reason", "refused")) for r in refused if isinstance(r, dict) and "uri" in r}


def _row(uri: str, status: str, code: str, reason: str) -> dict:
    name = os.path.basename(uri.rstrip("/")) or uri
    return file_row(uri, (), status=status, error_code=code, error=f"{name}: {reason}")


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="file", desc="annotate via endpoint")
