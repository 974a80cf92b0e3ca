"""The Ray Serve application: a FastAPI ingress that runs the ensemble members, or sends to one deployment each.

```
members: ingress (default)
HTTP ──► Ingress (FastAPI, × ingress_replicas)
          /predict, /annotate: annotate_file(uri, predict_proba, cfg)
          predict_proba: @serve.batch over the windows of the replica's concurrent requests
                         Bundle.features -> Bundle.member_forward (every member) -> Bundle.combine

members: deployments
HTTP ──► Ingress (FastAPI)                         MemberModel "member-<name>"  (× members)
          /predict, /annotate                        @serve.batch over windows
          annotate_file(uri, predict_proba, cfg)
          predict_proba: Bundle.features(windows) ──► Bundle.member_forward(i, features)
                         Bundle.combine(member logits, fetched concurrently)
```

Where the members run is a choice (``members``). Inside each ingress replica (``ingress``) a request
costs no calls between actors: on 2 CPUs the two member calls of a request cost more CPU than the
models themselves (``benchmarks/serve_latency.py``), so this is the default; replicas of the ingress
scale it out, each a process of its own. One deployment per member (``deployments``) places members
on their own GPUs or nodes and scales them separately, at the price of those calls.

The ingress runs the same ``annotate_file`` as offline annotation, extracts each distinct feature
config once (members that share one, like cnn and bigru_attn, get the same array) and combines member
logits with the same ``Bundle.combine``, so an endpoint answer equals the offline answer for the same
file. Members receive features, not waveforms: a 3 s log-mel window is 48 KB, which Ray passes inline
with the call, where a 192 KB waveform went through the object store and every member extracted the
same features again.

Every route but ``/healthz`` needs the API key (``ser_ray.auth``), and every route checks the
``Host`` header against ``allowed_hosts`` (a web page cannot reach a loopback endpoint by DNS
rebinding); both are checked by an ASGI middleware before any body is read.

``/annotate`` reads only local paths under ``allowed_roots`` and objects in ``allowed_buckets``
(``ser_ray.serve.access``); local files are opened by walking from the root without following
symlinks, so a link swapped in after the check cannot redirect the read. A request naming any URI
outside them is rejected as a whole (403, listing the offending URIs) before anything is read: a
client that sends a bad URI has a bug or is probing, and a partial answer would hide that. A URI that
is allowed but unreadable or not audio gets an ``error`` row in a 200 answer, like offline annotation.

Overload: at most ``max_queued_requests`` wait at the ingress (then 503 with ``Retry-After``), member
calls time out after ``member_timeout_s`` (503), and the HTTP proxy's ``request_timeout_s`` (set by
``ser-ray serve``) ends any request, a slow upload included.

Build with ``build_app(ServeConfig(...))``, or from a Serve config file with
``import_path: ser_ray.serve.app:app_builder`` and ``args: {bundle: ..., allowed_roots: [...]}``.
"""

import asyncio
import dataclasses
import io
import logging
import math
import os
import re
import time
import types
import typing
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from ser_ray import auth
from ser_ray.serve.access import AccessPolicy

logger = logging.getLogger("ray.serve")

MB = 1024 * 1024
MEMBER_PLACEMENTS = ("ingress", "deployments")


@dataclasses.dataclass
class ServeConfig:
    """Everything the Serve app needs; loads from a dict of strings (``serve run ... key=value``)."""

    bundle: str
    allowed_roots: list[str] = dataclasses.field(default_factory=list)
    allowed_buckets: list[str] = dataclasses.field(default_factory=list)
    max_upload_mb: float = 50.0
    max_uris_per_request: int = 256
    # windows all files of one /annotate request may make together (bounds the work and the answer)
    max_windows_per_request: int = 100_000
    # windowing as in AnnotateConfig, so endpoint and offline windows match; window_s None: the bundle's
    window_s: float | None = None
    hop_s: float = 1.5
    vad: str = "energy"
    # where the members run: "ingress" (inside each ingress replica) or "deployments" (one per member)
    members: str = "ingress"
    # auto: each member as ONNX Runtime (CPU) or TorchScript where its logits stay equal, else as saved
    backend: str = "auto"
    # member deployments (members: deployments); max_batch_size and batch_wait_timeout_s batch windows
    # in either placement
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # per member replica, or per ingress replica with members: ingress; fractions share a GPU
    # ingress deployment
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.5
    ingress_threads: int = 16  # annotate_file calls running at once per ingress replica
    ingress_max_ongoing: int = 64  # requests one ingress replica holds at once (uploads being read included)
    # audio length limits, checked from the header before any window is read
    max_duration_s: float = 4 * 3600.0  # a file named in /annotate
    max_upload_duration_s: float = 600.0  # an upload to /predict
    route_prefix: str = "/"
    # access: the API key's SHA-256 (from api_key_file or SER_RAY_API_KEY when unset); auth=false
    # serves without a key (only on a network you trust)
    auth: bool = True
    api_key_sha256: str | None = None
    api_key_file: str | None = None
    allowed_hosts: list[str] = dataclasses.field(default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"])
    # overload and time limits
    max_queued_requests: int = 64  # waiting at the ingress beyond its slots; more get 503 + Retry-After
    retry_after_s: float = 5.0
    member_timeout_s: float = 120.0  # one member call (a batch of windows)
    request_timeout_s: float = 900.0  # end to end, applied by the HTTP proxy (ser-ray serve sets it)

    @classmethod
    def from_dict(cls, args: dict) -> "ServeConfig":
        """Typed config from a dict; strings are converted (lists: comma-separated)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ValueError(f"unknown serve option(s) {unknown}; valid: {sorted(fields)}")
        if "bundle" not in args:
            raise ValueError("serve config needs `bundle` (a bundle directory or s3:// prefix)")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(v, hints[k], k) for k, v in args.items()})

    def annotate_config(self, bundle):
        """The ``AnnotateConfig`` the ingress passes to ``annotate_file`` for ``bundle``."""
        from ser_ray.annotate import AnnotateConfig

        window_s = self.window_s if self.window_s is not None else bundle.window_s
        return AnnotateConfig(window_s=window_s, hop_s=self.hop_s, vad=self.vad, labels=tuple(bundle.labels),
                              max_duration_s=self.max_duration_s, backend=self.backend)

    def __post_init__(self):
        from ser_ray.ensemble.runtime import BACKENDS

        if self.members not in MEMBER_PLACEMENTS:
            raise ValueError(f"serve option members={self.members!r}: choose one of {', '.join(MEMBER_PLACEMENTS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"serve option backend={self.backend!r}: choose one of {', '.join(BACKENDS)}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)


def _coerce(value, hint, name):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # ``float | None``
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
        origin = typing.get_origin(hint)
    try:
        if origin is list:
            if isinstance(value, str):
                return [v for v in (s.strip() for s in value.split(",")) if v]
            return [str(v) for v in (value or [])]
        if hint is bool and isinstance(value, str):
            return value.lower() in ("1", "true", "yes")
        if hint in (int, float, str):
            return hint(value)
    except (TypeError, ValueError):
        raise ValueError(f"serve option {name}={value!r}: expected {hint}") from None
    return value


# --------------------------------------------------------------------------------------------
# member deployment


@serve.deployment
class MemberModel:
    """One ensemble member: its input features ``[n, C, F]`` -> logits ``[n, labels]``, batched over requests.

    A request carries up to ``max_batch_size`` windows; ``@serve.batch`` counts windows (not
    requests) so one forward pass sees at most ``max_batch_size`` windows from any number of requests.
    """

    def __init__(self, bundle_uri: str, index: int, max_batch_size: int, batch_wait_timeout_s: float,
                 device: str = "cpu", backend: str = "auto"):
        import torch

        from ser_ray.ensemble.bundle import load_bundle

        # Ray sets OMP_NUM_THREADS from num_cpus; torch must follow it so members share cores fairly
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.bundle = load_bundle(bundle_uri, device=device)
        self.index = index
        self.bundle.optimise_for_inference(backend)
        self.name = self.bundle.members[index].name
        self.logits.set_max_batch_size(max_batch_size)
        self.logits.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("member %s (%d of %d) loaded from %s on %s", self.name, index + 1,
                    len(self.bundle.members), bundle_uri, device)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=lambda items: sum(len(x) for x in items))
    async def logits(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(c) for c in chunks]
        features = np.concatenate(chunks).astype(np.float32, copy=False)
        # off the event loop, so requests keep queueing (and batching) while the model runs
        out = await asyncio.to_thread(self.bundle.member_forward, self.index, features)
        return np.split(np.asarray(out), np.cumsum(sizes)[:-1])


# --------------------------------------------------------------------------------------------
# ingress

api = FastAPI(
    title="ser-ray",
    description="Speech emotion recognition: an ensemble bundle served with Ray Serve.",
)


class AnnotateRequest(BaseModel):
    uris: list[str]


class _TooLarge(Exception):
    pass


class _MembersUnavailable(RuntimeError):
    pass


# Helpers the routes use are defined before the ingress class: @serve.ingress pickles the FastAPI
# app (and with it the route functions) when the class is defined.


def _limited(request: Request, limit: int) -> Request:
    """The same request whose body reader raises ``_TooLarge`` once more than ``limit`` bytes arrive.

    The Content-Length header can be absent (chunked upload) or wrong, so bytes are counted as read.
    """
    seen = 0

    async def receive():
        nonlocal seen
        message = await request.receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge()
        return message

    return Request(request.scope, receive)


def _not_audio(data: bytes, name: str) -> str | None:
    """A message when ``data`` is not audio that soundfile (our decoder) can read, else None."""
    import soundfile as sf

    from ser_ray.audio.decode import AudioError, check_sample_rate, soundfile_cause

    if not data:
        return f"{name}: empty upload (0 bytes)"
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as exc:
        return f"{name}: not a readable audio file (soundfile: {soundfile_cause(exc)}); upload WAV, FLAC or OGG audio"
    if info.frames == 0:
        return f"{name}: audio has no samples"
    try:
        check_sample_rate(info.samplerate, name)
    except AudioError as exc:
        return str(exc)
    return None


def _release_memory() -> None:
    """Hand memory freed by a request back to the OS. The annotation threads each get a glibc arena;
    without a trim, a large upload's freed buffers stay in the ingress's RSS after it is answered."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _clean(value):
    """JSON-safe scalars: numpy -> Python, NaN -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clean_row(row: dict) -> dict:
    return {k: _clean(v) for k, v in row.items()}


class _Access:
    """The per-replica access settings the middleware checks (set by ``Ingress.__init__``)."""

    def __init__(self, config: ServeConfig):
        self.auth = config.auth
        self.key_sha256 = config.api_key_sha256
        self.hosts = {h.lower() for h in config.allowed_hosts}

    def refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        hostname = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if "*" not in self.hosts and hostname.lower() not in self.hosts:
            return JSONResponse(status_code=421, content={"detail": "this endpoint does not serve that Host name"})
        if scope.get("path", "").rstrip("/").endswith("/healthz"):
            return None
        if self.auth and not auth.key_matches(auth.presented_key(headers), self.key_sha256 or ""):
            return JSONResponse(status_code=401, headers={"WWW-Authenticate": "Bearer"}, content={
                "detail": "missing or wrong API key: send 'Authorization: Bearer <key>' (the key is in "
                          f"${auth.ENV} or the server's key file)"})
        return None


_ACCESS: _Access | None = None  # one ingress replica per process


def _set_access(access: _Access) -> None:
    # a module function, not code in Ingress: the Ingress class is pickled by value, so a `global`
    # statement in its methods would write to a copy of this module's globals
    global _ACCESS
    _ACCESS = access


class _AccessMiddleware:
    """Host allow-list and API key, checked before the route runs (and before any body is read)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = _ACCESS.refusal(scope) if _ACCESS is not None else JSONResponse(
                status_code=503, content={"detail": "starting"})
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


api.add_middleware(_AccessMiddleware)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, config: dict, members: list[DeploymentHandle]):
        from ser_ray.ensemble.bundle import load_bundle

        self.config = ServeConfig.from_dict(config)
        if self.config.auth and not self.config.api_key_sha256:
            raise ValueError("the endpoint needs an API key (build it with build_app)")
        _set_access(_Access(self.config))
        self.policy = AccessPolicy(self.config.allowed_roots, self.config.allowed_buckets)
        self.local = self.config.members == "ingress"
        if self.local:  # the members run here: torch follows the replica's CPUs (Ray sets OMP_NUM_THREADS)
            import torch

            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
            self._local_logits.set_max_batch_size(self.config.max_batch_size)
            self._local_logits.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        device = "cuda" if self.local and self.config.num_gpus > 0 else "cpu"
        self.bundle = load_bundle(self.config.bundle, device=device)  # labels, combine() and local members
        if self.local:
            self.bundle.optimise_for_inference(self.config.backend)
        self.loop: asyncio.AbstractEventLoop | None = None  # the replica's loop, where batches form
        self.annotate_config = self.config.annotate_config(self.bundle)
        self.labels = list(self.bundle.labels)
        self.members = members
        self.pool = ThreadPoolExecutor(self.config.ingress_threads, thread_name_prefix="annotate")
        # probes of local members do not queue behind annotations: a busy replica is not an unhealthy one
        self.probe_pool = ThreadPoolExecutor(len(self.bundle.members), thread_name_prefix="probe")
        logger.info("ingress ready: %d members, labels %s, access %s", len(members), self.labels,
                    self.policy.describe())

    # -- the model, as annotate_file sees it ------------------------------------------------
    def predict_proba(self, waves: np.ndarray) -> np.ndarray:
        """Windows ``[N, samples]`` -> probabilities ``[N, labels]`` via the member deployments.

        Every member gets every chunk at once (no waiting between calls), so members run in parallel
        and windows from concurrent requests share batches. Runs in a worker thread.
        """
        waves = np.ascontiguousarray(waves, dtype=np.float32)
        if len(waves) == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        timeout = self.config.member_timeout_s
        if self.local:
            calls = [asyncio.run_coroutine_threadsafe(self._local_logits(chunk), self.loop)
                     for chunk in self._chunks(waves)]
            parts = [call.result(timeout=timeout) for call in calls]
            return self.bundle.combine([np.concatenate([p[i] for p in parts]) for i in range(len(self.bundle.members))])
        pending = [self._send(handle, x) for handle, x in zip(self.members, self._member_features(waves))]
        logits = [np.concatenate([r.result(timeout_s=timeout) for r in responses]) for responses in pending]
        return self.bundle.combine(logits)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=lambda items: sum(len(x) for x in items))
    async def _local_logits(self, chunks: list[np.ndarray]) -> list[list[np.ndarray]]:
        """members: ingress. Windows of this replica's concurrent requests -> every member's logits,
        one forward pass per member for the whole batch (off the event loop)."""
        sizes = [len(c) for c in chunks]
        logits = await asyncio.to_thread(
            lambda waves: self.bundle.logits_from_features(self.bundle.features(waves)), np.concatenate(chunks))
        parts = [np.split(x, np.cumsum(sizes)[:-1]) for x in logits]
        return [[member[j] for member in parts] for j in range(len(chunks))]

    def _chunks(self, x: np.ndarray) -> list[np.ndarray]:
        """``x`` in pieces of at most ``max_batch_size`` windows (what one batched call may carry)."""
        step = self.config.max_batch_size
        return [x[s:s + step] for s in range(0, len(x), step)]

    def _member_features(self, waves: np.ndarray) -> list[np.ndarray]:
        """Each member's input features for ``waves``: one extraction per distinct feature config."""
        shared = self.bundle.features(waves)
        return [shared[m.feature_config] for m in self.bundle.members]

    def _send(self, handle: DeploymentHandle, features: np.ndarray) -> list:
        return [handle.logits.remote(chunk) for chunk in self._chunks(features)]

    def _annotate(self, path: str, uri: str, config=None, opener=None, budget=None) -> tuple[dict, list[dict]]:
        """``annotate_file`` through the members; rows name ``uri`` (what the client sent).

        ``annotate_file`` turns any exception into an error row. A failing or slow member is not a
        property of the file, so it raises ``_MembersUnavailable`` (-> 503, which clients retry)
        instead of an error row that a resumable client would commit for good.
        """
        from ser_ray.annotate import annotate_file

        failures: list[BaseException] = []

        def predict_proba(waves: np.ndarray) -> np.ndarray:
            try:
                return self.predict_proba(waves)
            except Exception as exc:
                failures.append(exc)
                # not an OSError (a member timeout is one): annotate_file must not retry it as storage
                raise _MembersUnavailable(type(exc).__name__) from None

        file_row, segments = annotate_file(path, predict_proba, config or self.annotate_config,
                                           opener=opener or self.policy.open, budget=budget)
        if failures:
            logger.error("model deployments failed while annotating %s: %r", uri, failures[0])
            raise _MembersUnavailable(f"model deployments failed ({type(failures[0]).__name__}); retry later")
        # rows name the URI the client sent, not the (resolved or temporary) path read
        if path != uri and file_row.get("error"):
            file_row["error"] = file_row["error"].replace(path, uri)
        file_row = dict(file_row, uri=uri)
        segments = [dict(s, uri=uri) for s in segments]
        return file_row, segments

    async def _in_thread(self, fn, *args, share: asyncio.Semaphore | None = None):
        self.loop = asyncio.get_running_loop()  # predict_proba hands windows back to it for batching
        try:
            if share is None:
                return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
            async with share:
                return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except _MembersUnavailable as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": f"{self.config.retry_after_s:.0f}"}) from None

    def _probe_members(self) -> dict[str, str]:
        """Each member's answer to one silent window: ``ok`` or the error's type."""
        samples = int(round(self.annotate_config.window_s * self.annotate_config.sample_rate))
        features = self._member_features(np.zeros((1, samples), dtype=np.float32))
        timeout = min(10.0, self.config.member_timeout_s)
        start = time.perf_counter()
        if self.local:
            calls = {m.name: self.probe_pool.submit(self.bundle.member_forward, i, x)
                     for i, (m, x) in enumerate(zip(self.bundle.members, features))}
        else:
            calls = {m.name: handle.logits.remote(x) for m, handle, x in zip(self.bundle.members, self.members, features)}
        states = {}
        for name, call in calls.items():
            try:
                out = np.asarray(call.result(timeout) if self.local else call.result(timeout_s=timeout))
                if self.local and time.perf_counter() - start > timeout:  # answered, but too late
                    states[name] = "TimeoutError"
                    continue
                states[name] = "ok" if out.shape == (1, len(self.labels)) and np.isfinite(out).all() else "bad output"
            except Exception as exc:
                states[name] = type(exc).__name__
        return states

    # -- routes -----------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self):
        """200 when every member answers a probe window within 10 s, else 503 naming the failing ones."""
        members = await asyncio.to_thread(self._probe_members)
        ok = all(state == "ok" for state in members.values())
        body = {"status": "ok" if ok else "unavailable", "members": [m.name for m in self.bundle.members],
                "member_status": members, "labels": self.labels,
                "limits": {"max_upload_mb": self.config.max_upload_mb, "max_duration_s": self.config.max_duration_s,
                           "max_upload_duration_s": self.config.max_upload_duration_s,
                           "max_uris_per_request": self.config.max_uris_per_request,
                           "max_windows_per_file": self.annotate_config.max_windows,
                           "max_windows_per_request": self.config.max_windows_per_request,
                           "max_queued_requests": self.config.max_queued_requests,
                           "member_timeout_s": self.config.member_timeout_s,
                           "request_timeout_s": self.config.request_timeout_s},
                "auth": "api-key" if self.config.auth else "none"}
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @api.get("/labels")
    def get_labels(self) -> dict:
        return {"labels": self.labels}

    @api.post(
        "/predict",
        openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"}}}}}}},
    )
    async def predict(self, request: Request):
        """One uploaded audio file (multipart field ``file``) -> label, probabilities, segments."""
        limit = self.config.max_upload_bytes
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise HTTPException(415, "send the audio as multipart/form-data with a field named 'file' "
                                     "(e.g. curl -F file=@clip.wav)")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"upload of {int(declared) / MB:.1f} MB is over the "
                                     f"{self.config.max_upload_mb:g} MB limit")
        form = None
        try:
            try:
                form = await _limited(request, limit).form(max_files=1, max_fields=4)
            except _TooLarge:
                raise HTTPException(413, f"upload is over the {self.config.max_upload_mb:g} MB limit") from None
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(400, "no file in the upload: send it as multipart field 'file'")
            name = os.path.basename(upload.filename or "upload")
            data = await upload.read()
        finally:
            if form is not None:
                await form.close()
        problem = _not_audio(data, name)
        if problem:
            raise HTTPException(415, problem)
        file_row, segments = await self._in_thread(self._annotate_bytes, data, name)
        if file_row.get("status") != "ok":
            raise HTTPException(422, file_row.get("error") or f"{name}: could not be annotated")
        return {
            "file": name,
            "label": file_row.get("label"),
            "probabilities": {lab: _clean(file_row.get(f"prob_{lab}")) for lab in self.labels},
            "duration_s": _clean(file_row.get("duration_s")),
            "n_segments": _clean(file_row.get("n_segments")),
            "segments": [
                {
                    "start_s": _clean(s.get("start_s")),
                    "end_s": _clean(s.get("end_s")),
                    "label": s.get("label"),
                    "confidence": _clean(s.get("confidence")),
                    "probabilities": {lab: _clean(s.get(f"prob_{lab}")) for lab in self.labels},
                }
                for s in segments
            ],
        }

    def _annotate_bytes(self, data: bytes, name: str) -> tuple[dict, list[dict]]:
        # read from memory: nothing is written to disk, nothing is left behind by a killed replica
        upload = dataclasses.replace(self.annotate_config, max_duration_s=self.config.max_upload_duration_s)
        try:
            return self._annotate(name, name, upload, opener=lambda _: io.BytesIO(data))
        finally:
            _release_memory()

    @api.post("/annotate")
    async def annotate(self, body: AnnotateRequest):
        """URIs under the allowed roots/buckets -> ``{"files": [...], "segments": [...]}`` rows."""
        if not body.uris:
            raise HTTPException(400, "`uris` is empty; send {\"uris\": [\"/allowed/root/a.wav\", ...]}")
        if len(body.uris) > self.config.max_uris_per_request:
            raise HTTPException(413, f"{len(body.uris)} URIs in one request; send at most "
                                     f"{self.config.max_uris_per_request} per request")
        uris = list(dict.fromkeys(body.uris))  # a repeated URI is annotated (and answered) once
        decisions = [self.policy.check(uri) for uri in uris]
        refused = [d for d in decisions if d.status != 200]
        if refused:
            # nothing is read when any URI is refused (see the module docstring); the answer does not
            # name the allowed roots or buckets: that is the server's business
            status = 403 if any(d.status == 403 for d in refused) else 400
            return JSONResponse(status_code=status, content={
                "detail": f"{len(refused)} of {len(decisions)} URIs refused; nothing was read",
                "refused": [{"uri": d.uri, "reason": d.reason} for d in refused],
            })
        # one request gets at most half the annotation threads, so a big batch cannot starve others
        share = asyncio.Semaphore(max(1, self.config.ingress_threads // 2))
        from ser_ray.annotate.core import WindowBudget

        budget = WindowBudget(self.config.max_windows_per_request)
        results = await asyncio.gather(*[self._in_thread(self._annotate, d.path, d.uri, None, None, budget,
                                                         share=share) for d in decisions])
        return {
            "files": [_clean_row(f) for f, _ in results],
            "segments": [_clean_row(s) for _, segs in results for s in segs],
        }


# --------------------------------------------------------------------------------------------
# building the application


def _member_names(bundle_uri: str) -> list[str]:
    from ser_ray.ensemble.bundle import read_bundle_json

    # bundle.json only: the driver needs the member names, not the models
    desc = read_bundle_json(bundle_uri)
    if desc.get("normalise_by", "none") != "none":
        # members batch windows of many requests together: there is no per-recording group to standardise
        raise ValueError(f"{bundle_uri}: its members were trained on speaker-normalised features, which the "
                         "endpoint does not serve yet; label archives with it offline: "
                         "`ser-ray annotate --bundle ... --normalise-by file`")
    return [m["name"] for m in desc["members"]]


def _deployment_name(name: str) -> str:
    return "member-" + re.sub(r"[^A-Za-z0-9_\-]", "-", str(name))


def with_api_key(config: ServeConfig) -> ServeConfig:
    """``config`` with ``api_key_sha256`` filled in from ``api_key_file`` or ``SER_RAY_API_KEY``, or a
    clear error when authentication is on and there is no key."""
    if not config.auth or config.api_key_sha256:
        return config
    key = auth.resolve_key(key_file=config.api_key_file)
    if key is None:
        raise ValueError(f"the endpoint needs an API key: set {auth.ENV}, api_key_file (--api-key-file), or "
                         f"create {auth.DEFAULT_KEY_FILE}; or serve with auth=false (--no-auth) on a trusted network")
    return dataclasses.replace(config, api_key_sha256=auth.digest(key), api_key_file=None)


def build_app(config: ServeConfig) -> Application:
    """The Serve application for ``config``: ``serve.run(build_app(cfg), route_prefix=cfg.route_prefix)``."""
    config = with_api_key(config)
    device = "cuda" if config.num_gpus > 0 else "cpu"
    actor = {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}
    members = []
    names = _member_names(config.bundle)
    for index, name in enumerate(names if config.members == "deployments" else []):
        members.append(
            MemberModel.options(
                name=_deployment_name(name),
                num_replicas=config.num_replicas,
                ray_actor_options=actor,
                # a batch only fills when this many requests can wait at a replica (RAY-NOTES)
                max_ongoing_requests=2 * config.max_batch_size,
            ).bind(config.bundle, index, config.max_batch_size, config.batch_wait_timeout_s, device, config.backend)
        )
    from ray.serve.config import BackpressureConfig

    return Ingress.options(
        name="ingress",
        num_replicas=config.ingress_replicas,
        # a fixed mmap threshold: glibc otherwise raises it after each large free, and a big upload's
        # buffers then stay in the heap (RSS) after the request instead of going back to the OS
        ray_actor_options={"num_cpus": config.ingress_num_cpus,
                           **({"num_gpus": config.num_gpus} if config.members == "ingress" and config.num_gpus else {}),
                           "runtime_env": {"env_vars": {"MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}}},
        max_ongoing_requests=config.ingress_max_ongoing,
        max_queued_requests=config.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s),
    ).bind(dataclasses.asdict(config), members)


def app_builder(args: dict) -> Application:
    """For ``serve run ser_ray.serve.app:app_builder bundle=PATH allowed_roots=/a,/b`` and config files."""
    return build_app(ServeConfig.from_dict(dict(args)))
