"""Shared test fixtures: one real local Ray per test session, a real S3 server on loopback."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# real EmoDB: ../shared/data/emodb next to the checkout, or wherever SER_RAY_EMODB points
EMODB = Path(os.environ.get("SER_RAY_EMODB", REPO.parent / "shared" / "data" / "emodb"))


def _serve_proxy_as_users_get_it() -> None:
    """Every Ray the tests start (the session's, `ray start` nodes, subprocess commands) serves HTTP the
    way a Ray that ser-ray starts does: through HAProxy when its binary is installed."""
    from ser_ray.session import use_serve_proxy

    use_serve_proxy()


_serve_proxy_as_users_get_it()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_node_env() -> dict[str, str]:
    """The environment of a ``ray start`` node a test starts (and of its clients): token auth as a user's
    ``ray start --head`` has it, this checkout importable, no inherited address, and no 30 s drain on
    SIGTERM (Ray's default for ``ray start --block``): the tests tear nodes down, not upgrade them."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="session")
def emodb_root() -> Path:
    if not EMODB.is_dir():
        pytest.skip(f"real EmoDB not found at {EMODB}")
    return EMODB


def _fix_moto_complete_multipart() -> None:
    """moto 5.2.1 names CompleteMultipartUpload's XML root ``...Response`` instead of ``...Result``
    (getmoto/moto#10055); pyarrow's S3 client (every ``storage.write_bytes``, Ray Data writes) then
    retries and fails with INTERNAL_FAILURE. The server runs in this process, so patch its serializer.
    """
    from moto.core import serialize

    original = serialize.S3Serializer._serialized_result_to_response
    if getattr(original, "_ser_ray_fixed", False):
        return

    def patched(self, resp, result, shape, serialized_result):
        resp = original(self, resp, result, shape, serialized_result)
        if self.operation_model.name == "CompleteMultipartUpload":
            resp["body"] = resp["body"].replace(
                "CompleteMultipartUploadResponse", "CompleteMultipartUploadResult"
            )
        return resp

    patched._ser_ray_fixed = True
    serialize.S3Serializer._serialized_result_to_response = patched


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; ``AWS_ENDPOINT_URL`` points every client at it.

    Started before Ray so that Ray's workers inherit the endpoint and credentials.
    """
    from moto.server import ThreadedMotoServer

    _fix_moto_complete_multipart()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket name on the loopback S3 server, and a boto3 client for setting it up."""
    import boto3

    client = boto3.client("s3")
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{free_port()}"
    client.create_bucket(Bucket=name)
    return name, client


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """The one local Ray of this test run (2 CPUs)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 * 1024**2,
        log_to_driver=False,
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
