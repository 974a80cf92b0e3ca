"""One writer per annotation output at a time.

Two runs committing into one output would pick the same batch numbers and delete each other's
half-written parts. ``OutputLock`` makes the second run refuse with a message naming the first:

- local outputs: an exclusive ``flock`` on ``OUTPUT/.lock``, released by the kernel when the holder
  exits, however it exits;
- ``s3://`` outputs: a lease object ``OUTPUT/_lock.json`` created with a conditional put
  (``If-None-Match: *``), renewed by a background thread (``If-Match`` on its ETag) and deleted on
  release. A lease left by a killed run is taken over once it is stale: its holder's process is gone
  (same host) or it was not renewed for ``ttl_s`` seconds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import uuid

from ser_ray import storage
from ser_ray.errors import UserError

log = logging.getLogger(__name__)

LOCK_TTL_S = 120.0


class OutputBusy(UserError, RuntimeError):
    """Another run holds the output's lock."""


def _holder() -> dict:
    return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # exists (another user's) or unknown: assume alive
    return True


class OutputLock:
    def __init__(self, output_uri: str, ttl_s: float = LOCK_TTL_S):
        self.output_uri = str(output_uri).rstrip("/")
        self.ttl_s = ttl_s
        self.holder = _holder()
        self._file = None
        self._etag = None
        self._stop = threading.Event()
        self._thread = None
        self.lost = False

    # -- local ----------------------------------------------------------------------------------
    def _acquire_local(self) -> None:
        import fcntl

        path = os.path.join(os.path.abspath(os.path.expanduser(self.output_uri)), ".lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            other = {}
            with contextlib.suppress(ValueError):
                other = json.loads(f.read() or "{}")
            f.close()
            raise OutputBusy(f"{self.output_uri} is being written by another annotate run ({_describe(other)}); "
                             "wait for it to finish or write to another output") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(self.holder))
        f.flush()
        self._file = f

    # -- s3 -------------------------------------------------------------------------------------
    def _s3(self):
        import boto3

        return boto3.client("s3")  # AWS_ENDPOINT_URL and credentials as for every other client

    def _key(self) -> tuple[str, str]:
        bucket, _, prefix = self.output_uri[len("s3://"):].partition("/")
        return bucket, (prefix.rstrip("/") + "/_lock.json").lstrip("/")

    def _acquire_s3(self) -> None:
        from botocore.exceptions import ClientError

        client, (bucket, key) = self._s3(), self._key()
        body = json.dumps(self.holder).encode()
        try:
            self._etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")["ETag"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            current = client.get_object(Bucket=bucket, Key=key)
            other = json.loads(current["Body"].read() or b"{}")
            age = (dt.datetime.now(dt.timezone.utc) - current["LastModified"]).total_seconds()
            dead = other.get("host") == socket.gethostname() and not _pid_alive(other.get("pid"))
            if not dead and age < self.ttl_s:
                raise OutputBusy(f"{self.output_uri} is being written by another annotate run ({_describe(other)}, "
                                 f"renewed {age:.0f} s ago); wait for it to finish, or for its lease to lapse "
                                 f"{self.ttl_s:.0f} s after its last renewal") from None
            try:  # take over the stale lease; If-Match: only one taker wins
                self._etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=current["ETag"])["ETag"]
            except ClientError:
                raise OutputBusy(f"{self.output_uri}: another run took over the stale lock first") from None
            log.warning("%s: took over a stale lock (%s)", self.output_uri, _describe(other))
        self._thread = threading.Thread(target=self._renew, name="output-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        client, (bucket, key) = self._s3(), self._key()
        body = json.dumps(self.holder).encode()
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self._etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=self._etag)["ETag"]
            except Exception as exc:  # lease taken over (412) or the store is unreachable
                code = getattr(exc, "response", {}).get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "NoSuchKey"):
                    self.lost = True
                    log.error("%s: lost the output lock to another run; stopping commits", self.output_uri)
                    return
                log.warning("%s: renewing the output lock failed (%r); trying again", self.output_uri, exc)

    # -- both -----------------------------------------------------------------------------------
    def acquire(self) -> "OutputLock":
        if storage.is_s3(self.output_uri):
            self._acquire_s3()
        else:
            self._acquire_local()
        return self

    def check(self) -> None:
        """Raise ``OutputBusy`` if the lease was lost (only possible on S3, after a long stall)."""
        if self.lost:
            raise OutputBusy(f"{self.output_uri}: the output lock was taken over by another run; stopped")

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
            if not self.lost:
                client, (bucket, key) = self._s3(), self._key()
                with contextlib.suppress(Exception):
                    if client.head_object(Bucket=bucket, Key=key)["ETag"] == self._etag:  # still ours
                        client.delete_object(Bucket=bucket, Key=key)
