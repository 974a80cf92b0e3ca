"""A real two-node Ray cluster on this machine (``ray start --head`` + ``ray start --address``, each its
own ports, temp dir and process group) and a node lost in the middle of a job.

On one machine this shows correctness across nodes, not speed-up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import free_port
from ser_ray.annotate.writer import ResultWriter

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
LABELS = ["anger", "happiness", "neutral", "sadness"]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    # its own process group: killing the group takes the node's raylet and workers with it
    return subprocess.Popen([RAY, "start", "--block", "--num-gpus=0", "--disable-usage-stats",
                             "--object-store-memory=200000000", "--node-ip-address=127.0.0.1", *args],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _alive_nodes(env: dict, address: str) -> int:
    code = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head (1 CPU, the job server) and a second node (1 CPU, resource ``second_node``)."""
    logs = tmp_path_factory.mktemp("cluster-logs")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    head_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = _start(["--head", "--num-cpus=1", f"--port={port}", "--include-dashboard=true",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={head_tmp}",
                   "--min-worker-port=62000", "--max-worker-port=62400",
                   *(f"--{flag}={free_port()}" for flag in (
                       "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                       "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port"))],
                  env, logs / "head.log")
    nodes, temp_dirs = [head], [head_tmp]
    address = f"127.0.0.1:{port}"
    client_env = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}"}
    try:
        deadline = time.time() + 120
        while subprocess.run([RAY, "job", "list"], env=client_env, capture_output=True, timeout=60).returncode:
            assert head.poll() is None and time.time() < deadline, (logs / "head.log").read_text()[-3000:]
            time.sleep(2)

        def add_node() -> subprocess.Popen:
            # disjoint worker ports from the head's: both nodes live on one machine
            # its own temp dir: on a shared one both nodes' runtime-env agents unpack the job's working
            # directory into the same folder, and the driver saw modules vanish under it
            node_tmp = tempfile.mkdtemp(prefix="rn", dir="/tmp")
            temp_dirs.append(node_tmp)
            node = _start([f"--address={address}", "--num-cpus=1", '--resources={"second_node": 1}',
                           f"--temp-dir={node_tmp}",
                           "--min-worker-port=62500", "--max-worker-port=62900",
                           *(f"--{flag}={free_port()}" for flag in (
                               "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                               "metrics-export-port", "runtime-env-agent-port"))],
                          env, logs / f"node{len(nodes)}.log")
            nodes.append(node)
            deadline = time.time() + 120
            while _alive_nodes(env, address) < 2:
                assert node.poll() is None and time.time() < deadline, \
                    (logs / f"node{len(nodes) - 1}.log").read_text()[-3000:]
                time.sleep(2)
            return node

        yield {"env": client_env, "address": address, "add_node": add_node, "logs": logs}
    finally:
        for node in reversed(nodes):
            _stop(node)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _bundle(path: Path) -> str:
    from ser_ray.ensemble import Bundle, Member, save_bundle
    from ser_ray.features.config import FeatureConfig
    from ser_ray.models import build_model

    fc = FeatureConfig(n_mels=32)
    torch.manual_seed(0)
    save_bundle(Bundle(LABELS, [Member("cnn", build_model("cnn", len(LABELS), fc, width=4).eval(), fc)]), str(path))
    return str(path)


@pytest.mark.timeout(600)
def test_annotate_job_loses_a_node_and_still_writes_one_row_per_file(two_nodes, tmp_path):
    """`ray job submit` of jobs/annotate.py with an actor on each node; the second node is killed
    (its whole process group, raylet included) after the first committed batch. The job finishes on
    the head alone with exactly one row per input file and no repeated segments."""
    archive = tmp_path / "archive"
    archive.mkdir()
    rng = np.random.default_rng(0)
    n_files = 24
    for i in range(n_files):
        sf.write(archive / f"rec{i:02d}.wav", (0.1 * rng.standard_normal(16_000 * 60)).astype(np.float32), 16_000)
    (archive / "notes.txt").write_text("not audio")
    bundle, out = _bundle(tmp_path / "bundle"), tmp_path / "labels"
    node = two_nodes["add_node"]()
    env = two_nodes["env"]
    job = subprocess.run(
        [RAY, "job", "submit", "--no-wait", "--working-dir", str(REPO), "--submission-id", "annotate-node-loss", "--",
         "python", "jobs/annotate.py", "--input", str(archive), "--output", str(out), "--bundle", bundle,
         "--batch-files", "1", "--num-actors", "2", "--hop-s", "0.5"],
        env=env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stdout + job.stderr

    def committed() -> int:
        return len(list((out / "files").glob("part-*.parquet"))) if (out / "files").exists() else 0

    deadline, checked = time.time() + 300, 0.0
    while committed() < 1:  # polled tightly: the kill must land while files are still being labelled
        if time.time() - checked > 5:
            status = subprocess.run([RAY, "job", "status", "annotate-node-loss"], env=env, capture_output=True,
                                    text=True, timeout=60)
            assert "FAILED" not in (status.stdout + status.stderr).upper(), status.stdout + status.stderr
            checked = time.time()
        assert time.time() < deadline, "no batch was committed within 300 s"
        time.sleep(0.05)
    before = committed()
    _stop(node, signal.SIGKILL)  # the second node dies mid-job
    assert before < n_files + 1, "the job finished before the node was killed"
    killed_at = time.time()

    while True:
        status = subprocess.run([RAY, "job", "status", "annotate-node-loss"], env=env, capture_output=True,
                                text=True, timeout=60)
        text = (status.stdout + status.stderr).upper()
        if "SUCCEEDED" in text or "FAILED" in text or "STOPPED" in text:
            break
        assert time.time() - killed_at < 400, "the job did not finish after the node was lost"
        time.sleep(2)
    logs = subprocess.run([RAY, "job", "logs", "annotate-node-loss"], env=env, capture_output=True, text=True,
                          timeout=60).stdout
    assert "SUCCEEDED" in text, logs[-4000:]
    files, segments = ResultWriter(str(out)).read_tables()
    assert len(files) == n_files + 1 and files["uri"].is_unique, files[["uri", "status"]]
    assert (files["status"] == "ok").sum() == n_files, files[["uri", "status", "error"]]
    assert not segments.duplicated(["uri", "start_s", "end_s"]).any()
    assert "lost workers" in logs  # the pool was rebuilt on the head and the rest done there
    # the same windows and probabilities as one process labelling those files alone
    from ser_ray.annotate.core import AnnotateConfig, annotate_file
    from ser_ray.ensemble.bundle import load_bundle

    model = load_bundle(bundle)
    config = AnnotateConfig(hop_s=0.5).with_labels(model.labels)
    for uri in sorted(files.loc[files["status"] == "ok", "uri"])[::8]:
        _, alone = annotate_file(uri, model.predict_proba, config)
        ours = segments[segments["uri"] == uri].sort_values("start_s")
        assert [s["label"] for s in alone] == ours["label"].tolist()
        assert np.allclose([s["confidence"] for s in alone], ours["confidence"], atol=1e-5)
    print(json.dumps({"committed_before_kill": before, "rows": len(files), "segments": len(segments),
                      "resumed": [line for line in logs.splitlines() if "lost workers" in line][:1]}))
