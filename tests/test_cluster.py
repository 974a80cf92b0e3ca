"""A real Ray cluster on this machine: a head with no CPUs (the job server, GCS, dashboard, Serve's
controller and proxy, the jobs' drivers) and two worker nodes of one CPU each (``ray start --head`` +
``ray start --address``, each its own ports, temp dir and process group), so every task, actor and
replica runs on a worker node; and a worker node lost in the middle of a job.

On one machine this shows correctness across nodes, not speed-up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import free_port, ray_node_env
from ser_ray.annotate.writer import ResultWriter

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
LABELS = ["anger", "happiness", "neutral", "sadness"]
WORKER_NODES = 2


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
            proc.wait(timeout=10)  # the node's own shutdown; past that, nothing of it is needed
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _alive_nodes(env: dict, address: str) -> dict[str, str]:
    """``{node_id: raylet socket path}`` (it lies in the node's temp dir) of the cluster's alive nodes
    ({} while it does not answer)."""
    code = (f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
            "print('RESULT', json.dumps({n['NodeID']: n['RayletSocketName'] for n in ray.nodes() if n['Alive']}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return _result(out.stdout) if out.returncode == 0 and "RESULT " in out.stdout else {}


def _result(stdout: str):
    """The JSON a helper subprocess printed after ``RESULT `` (Ray may print notices after it, such as
    a lost node's lagging heartbeats)."""
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("RESULT "))[7:])


@dataclasses.dataclass
class WorkerNode:
    proc: subprocess.Popen
    temp_dir: str
    node_id: str

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the node's whole process group: raylet, object store and workers."""
        _stop(self.proc, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """A head with 0 CPUs and two worker nodes of 1 CPU each; all see the loopback S3 server (its
    endpoint and credentials are in the environment they start with), which stands for the storage of
    nodes that share no disk. ``cluster["workers"]()`` gives the two running worker nodes, starting a
    replacement for any a test killed (what an autoscaler does)."""
    logs = tmp_path_factory.mktemp("cluster-logs")
    env = ray_node_env()
    port, dash = free_port(), free_port()
    head_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = _start(["--head", "--num-cpus=0", f"--port={port}", "--include-dashboard=true",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={head_tmp}",
                   "--min-worker-port=62000", "--max-worker-port=62300",
                   *(f"--{flag}={free_port()}" for flag in (
                       "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                       "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port"))],
                  env, logs / "head.log")
    procs, temp_dirs, workers = [head], [head_tmp], []
    address = f"127.0.0.1:{port}"
    client_env = {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}"}
    try:
        deadline = time.time() + 120
        while subprocess.run([RAY, "job", "list"], env=client_env, capture_output=True, timeout=60).returncode:
            assert head.poll() is None and time.time() < deadline, (logs / "head.log").read_text()[-3000:]
            time.sleep(2)

        def running_workers() -> list[WorkerNode]:
            """The two running worker nodes, after starting one for each that is gone."""
            workers[:] = [w for w in workers if w.alive()]
            while len(workers) < WORKER_NODES:
                workers.append(add_worker(len(procs)))
            return list(workers)

        def add_worker(index: int) -> WorkerNode:
            # worker ports disjoint from the head's and from the other nodes' (all on one machine);
            # its own temp dir: on a shared one the nodes' runtime-env agents unpack the job's working
            # directory into the same folder, and the driver saw modules vanish under it
            node_tmp = tempfile.mkdtemp(prefix="rn", dir="/tmp")
            temp_dirs.append(node_tmp)
            first_port = 62400 + 300 * (index % 10)
            log = logs / f"node{index}.log"
            before = _alive_nodes(env, address)
            proc = _start([f"--address={address}", "--num-cpus=1", f"--temp-dir={node_tmp}",
                           f"--min-worker-port={first_port}", f"--max-worker-port={first_port + 250}",
                           *(f"--{flag}={free_port()}" for flag in (
                               "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                               "metrics-export-port", "runtime-env-agent-port"))],
                          env, log)
            procs.append(proc)
            deadline = time.time() + 120
            while True:
                new = [node for node, socket in _alive_nodes(env, address).items()
                       if node not in before and socket.startswith(node_tmp)]
                if new:
                    return WorkerNode(proc, node_tmp, new[0])
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(2)

        yield {"env": client_env, "address": address, "workers": running_workers, "logs": logs,
               "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        for proc in reversed(procs):
            _stop(proc)
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


def _submit(env: dict, submission_id: str, *command: str, timeout: float = 420) -> str:
    """``ray job submit`` (waits for the end); the job's logs, asserting it SUCCEEDED."""
    done = subprocess.run([RAY, "job", "submit", "--working-dir", str(REPO), "--submission-id", submission_id,
                           "--", "python", *command], env=env, capture_output=True, text=True, timeout=timeout)
    status = subprocess.run([RAY, "job", "status", submission_id], env=env, capture_output=True, text=True,
                            timeout=60)
    logs = done.stdout + done.stderr
    assert done.returncode == 0 and "SUCCEEDED" in (status.stdout + status.stderr).upper(), logs[-5000:]
    return logs


def _wait_for_end(env: dict, submission_id: str, since: float, message: str, limit_s: float = 400) -> str:
    """The job's final status line (upper case) once it SUCCEEDED, FAILED or STOPPED, within ``limit_s``."""
    while True:
        status = subprocess.run([RAY, "job", "status", submission_id], env=env, capture_output=True, text=True,
                                timeout=60)
        text = (status.stdout + status.stderr).upper()
        if "SUCCEEDED" in text or "FAILED" in text or "STOPPED" in text:
            return text
        assert time.time() - since < limit_s, message
        time.sleep(2)


def _job_logs(env: dict, submission_id: str) -> str:
    return subprocess.run([RAY, "job", "logs", submission_id], env=env, capture_output=True, text=True,
                          timeout=60).stdout


def _wait_while_running(env: dict, submission_id: str, done, what: str, *, limit_s: float = 300,
                        poll_s: float = 0.2) -> None:
    """Poll ``done()`` every ``poll_s`` (tightly: a kill must land mid-job) until it is true; fail when
    the job FAILED (checked every 5 s) or after ``limit_s``, with the job's log."""
    deadline, checked = time.time() + limit_s, 0.0
    while not done():
        if time.time() - checked > 5:
            status = subprocess.run([RAY, "job", "status", submission_id], env=env, capture_output=True,
                                    text=True, timeout=60)
            assert "FAILED" not in (status.stdout + status.stderr).upper(), _job_logs(env, submission_id)[-5000:]
            checked = time.time()
        assert time.time() < deadline, f"{what} within {limit_s:.0f} s:\n{_job_logs(env, submission_id)[-5000:]}"
        time.sleep(poll_s)


def _actor_nodes(env: dict, submission_id: str, class_part: str) -> set[str]:
    """The node ids of every actor (alive or dead) of a job whose class name contains ``class_part``."""
    code = textwrap.dedent(f"""
        import json, os
        from ray.job_submission import JobSubmissionClient
        from ray.util.state import list_actors
        address = os.environ["RAY_API_SERVER_ADDRESS"]
        job = JobSubmissionClient(address).get_job_info({submission_id!r}).job_id
        actors = list_actors(address=address, filters=[("job_id", "=", job)], limit=10_000,
                             raise_on_missing_output=False, detail=True)
        nodes = {{a.node_id for a in actors if {class_part!r} in a.class_name and a.node_id}}
        print("RESULT", json.dumps(sorted(nodes)))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(_result(out.stdout))


def _task_nodes(env: dict, submission_id: str, name_part: str) -> dict[str, int]:
    """``{node_id: tasks}`` of the finished tasks of a job whose name contains ``name_part`` (state API)."""
    code = textwrap.dedent(f"""
        import collections, json, os
        from ray.job_submission import JobSubmissionClient
        from ray.util.state import list_tasks
        address = os.environ["RAY_API_SERVER_ADDRESS"]
        job = JobSubmissionClient(address).get_job_info({submission_id!r}).job_id
        tasks = list_tasks(address=address, filters=[("job_id", "=", job)], limit=10_000, raise_on_missing_output=False)
        print("RESULT", json.dumps(collections.Counter(t.node_id for t in tasks if {name_part!r} in t.name
                                             and t.state == "FINISHED")))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return _result(out.stdout)


@pytest.fixture(scope="module")
def s3_corpus(s3_server, tmp_path_factory):
    """A 48-clip synthetic corpus (6 actors) in a bucket of the loopback S3 server: ``(bucket, client)``."""
    import boto3

    from ser_ray.corpora.synthetic import generate

    client = boto3.client("s3")
    bucket = f"cluster-{free_port()}"
    client.create_bucket(Bucket=bucket)
    corpus = tmp_path_factory.mktemp("synthetic")
    generate(corpus, actors=6, seed=1, sentences=["TIE", "IOM"], emotions=["neutral", "anger", "happiness", "sadness"],
             workers=1, progress=False)
    for path in corpus.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"corpus/{path.relative_to(corpus)}")
    return bucket, client


@pytest.mark.timeout(600)
def test_prepare_job_runs_blocks_on_both_worker_nodes_and_matches_one_process(cluster, s3_corpus):
    """jobs/prepare.py from and into S3 on the cluster: feature blocks run on both worker nodes, and
    every cached row equals what the one extractor gives in this process for the same clip."""
    from ser_ray.features.config import FeatureConfig
    from ser_ray.features.pipeline import extract_batch, features_array, load_cache_pandas
    from ser_ray.corpora.manifest import read_manifest

    bucket, client = s3_corpus
    workers = cluster["workers"]()
    env = cluster["env"]
    logs = _submit(env, "prepare-two-nodes", "jobs/prepare.py", "--corpus", "synthetic", "--root",
                   f"s3://{bucket}/corpus", "--out", f"s3://{bucket}/cache")
    assert "48 clips: 48 ok, 0 errors" in logs, logs[-3000:]
    nodes = _task_nodes(env, "prepare-two-nodes", "extract_batch")
    # 4 blocks (2 per CPU), on both worker nodes
    assert set(nodes) == {w.node_id for w in workers} and sum(nodes.values()) == 4, nodes

    manifest = read_manifest(f"s3://{bucket}/cache/manifest.parquet")
    cache = load_cache_pandas(_only_cache(client, bucket)).set_index("path")
    assert len(cache) == 48 and cache["error"].isna().all()
    alone = extract_batch(manifest, FeatureConfig()).to_pandas().set_index("path")
    paths = list(manifest["path"])
    assert np.allclose(features_array(cache.loc[paths]), features_array(alone.loc[paths]), atol=1e-5)


def _only_cache(client, bucket: str) -> str:
    keys = {obj["Key"].split("/")[1] for obj in client.list_objects_v2(Bucket=bucket, Prefix="cache/")["Contents"]
            if obj["Key"].count("/") >= 2}
    assert len(keys) == 1, keys
    return f"s3://{bucket}/cache/{keys.pop()}"


def _two_trial_search(name: str, bucket: str, epochs: int) -> dict:
    """A tune config of two cnn trials at once (0.25 CPU for the trial + 0.75 for its Train worker:
    one per worker node), data on the S3 corpus, ASHA off (grace period = epochs)."""
    return {
        "name": name,
        "data": {"corpus": "synthetic", "root": f"s3://{bucket}/corpus", "protocol": "kfold", "k": 3,
                 "test_fold": 0, "val_fraction": 0.25, "features": {"n_mels": 32, "window_s": 1.5}},
        "families": ["cnn"], "num_samples": 2, "max_epochs": epochs, "grace_period": epochs,
        "max_concurrent_trials": 2, "seed": 0, "tpe_startup_trials": 2, "evaluate_test": False,
        "resources": {"cnn": {"cpu": 0.75}}, "train": {"patience": 0, "batch_size": 8},
        "space": {"cnn": {"hparams": {"width": {"choice": [8]}}}},
    }


@pytest.mark.timeout(600)
def test_tune_job_on_the_cluster_gives_the_rows_of_one_node(cluster, s3_corpus, tmp_path):
    """The same search of two trials (TPE seeded, so both runs sample the same points) as a job on the
    cluster (one trial per worker node, data and experiment on S3) and as jobs/tune.py on a one-node
    local Ray: each trial reports the same validation UA at every epoch in both runs and ends with the
    same weights."""
    import yaml

    from ser_ray import storage
    from ser_ray.models import load_model

    bucket, _ = s3_corpus
    epochs = 3
    config = _two_trial_search("same-rows", bucket, epochs)
    config_path = REPO / ".cluster-tune-rows.yaml"  # inside the working dir the job is given
    config_path.write_text(yaml.safe_dump(config))
    cluster["workers"]()
    try:
        _submit(cluster["env"], "tune-same-rows", "jobs/tune.py", "--config", config_path.name,
                "--out", f"s3://{bucket}/tune-rows")
    finally:
        config_path.unlink()
    one_node = tmp_path / "tune.yaml"
    one_node.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    done = subprocess.run([sys.executable, "jobs/tune.py", "--config", str(one_node), "--out", str(tmp_path / "one")],
                          cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]

    tables = {"cluster": storage.read_parquet(f"s3://{bucket}/tune-rows/same-rows/trials.parquet"),
              "one node": storage.read_parquet(str(tmp_path / "one" / "same-rows" / "trials.parquet"))}
    runs = {}  # where -> {trial's sampled point: (val UA per epoch, weights of its best checkpoint)}
    for where, table in tables.items():
        assert len(table) == 2 and (table["status"] == "ok").all() and (table["epochs_run"] == epochs).all(), \
            (where, table)
        runs[where] = {}
        for point, history, checkpoint in zip(table["config"], table["history"], table["checkpoint_path"]):
            model, _ = load_model(checkpoint)
            runs[where][point] = ([(p["epochs_done"], p["val_ua"]) for p in json.loads(history)],
                                  {k: v.detach().numpy() for k, v in model.state_dict().items()})
    cluster_run, one_node_run = runs["cluster"], runs["one node"]
    assert set(cluster_run) == set(one_node_run) and len(cluster_run) == 2, runs  # TPE is seeded
    curves = {}
    for point, (curve, weights) in cluster_run.items():
        other_curve, other_weights = one_node_run[point]
        assert curve == other_curve, (point, curve, other_curve)
        for name, value in weights.items():
            assert np.allclose(other_weights[name], value, atol=1e-5), (point, name)
        curves[point] = curve
    print(json.dumps({"val_ua_per_epoch": curves}))


@pytest.mark.timeout(600)
def test_tune_job_loses_a_node_and_its_trial_resumes_from_a_checkpoint(cluster, s3_corpus, tmp_path):
    """jobs/tune.py with two cnn trials at once (0.25 CPU for the trial + 0.75 for its Train worker:
    one trial per worker node), data and experiment on S3. Both trials are held at the start of their
    third epoch (a test hook in the training loop, after Train has registered their checkpoints), so
    the kill always lands mid-search: the worker node of one trial is killed and a replacement joins
    (what an autoscaler does; the surviving node is full), then the trials are released. The trial it
    held is started again and resumes from its last checkpoint; the search finishes with both trials ok
    and every epoch run, and no epoch reported twice in the kept history."""
    import yaml

    bucket, client = s3_corpus
    epochs = 6
    config = _two_trial_search("node-loss", bucket, epochs)
    config_path = REPO / ".cluster-tune.yaml"  # inside the working dir the job is given
    config_path.write_text(yaml.safe_dump(config))
    workers = cluster["workers"]()
    env = cluster["env"]
    hold = tmp_path / "hold"
    hold.mkdir()
    hook = {"env_vars": {"SER_RAY_TEST_HOLD_DIR": str(hold), "SER_RAY_TEST_HOLD_AT_EPOCH": "2"}}
    try:
        job = subprocess.run([RAY, "job", "submit", "--no-wait", "--working-dir", str(REPO), "--submission-id",
                              "tune-node-loss", "--runtime-env-json", json.dumps(hook), "--", "python",
                              "jobs/tune.py", "--config", config_path.name,
                              "--out", f"s3://{bucket}/tune"], env=env, capture_output=True, text=True, timeout=120)
    finally:
        config_path.unlink()
    assert job.returncode == 0, job.stdout + job.stderr

    def checkpoints() -> set[str]:
        listed = client.list_objects_v2(Bucket=bucket, Prefix="tune/node-loss/train/")
        return {obj["Key"].split("/")[3] + "/" + obj["Key"].split("/")[4] for obj in listed.get("Contents", [])
                if "/checkpoint_" in obj["Key"]}

    def logs() -> str:
        return _job_logs(env, "tune-node-loss")

    try:
        # both trials wait at epoch 2 with their checkpoints registered: what a restarted run resumes from
        _wait_while_running(env, "tune-node-loss", lambda: len(list(hold.glob("held-*"))) >= 2,
                            "the two trials did not reach epoch 2")
        saved = checkpoints()
        held_on = sorted(path.read_text().strip() for path in hold.glob("held-*"))
        assert set(held_on) == {w.node_id for w in workers}, (held_on, workers)  # one trial per worker node
        workers[1].kill()
        killed_at = time.time()
        time.sleep(3)
        cluster["workers"]()  # a replacement node
        (hold / "release").write_text("go\n")
        text = _wait_for_end(env, "tune-node-loss", killed_at, "the search did not finish after the node was lost")
    finally:  # a search still running must not hold the cluster for the next test
        subprocess.run([RAY, "job", "stop", "tune-node-loss"], env=env, capture_output=True, timeout=120)
    logs = logs()
    assert "SUCCEEDED" in text, logs[-5000:]
    from ser_ray import storage

    table = storage.read_parquet(f"s3://{bucket}/tune/node-loss/trials.parquet")
    assert len(table) == 2 and (table["status"] == "ok").all(), table
    assert (table["epochs_run"] == epochs).all(), table[["trial_id", "epochs_run"]]
    for history in table["history"]:  # each epoch at most once, in order, up to the last
        # (an epoch checkpointed but not yet reported to Tune when the node died is missing here;
        # training went on after it, not from the start)
        done = [point["epochs_done"] for point in json.loads(history)]
        assert done == sorted(set(done)) and done[-1] == epochs, done
    failed = [line for line in logs.splitlines() if "Trial task failed" in line]
    # a trial went on from its checkpoint, not from epoch 0
    assert table["restarts"].max() >= 1, (table[["trial_id", "epochs_run", "restarts"]], sorted(saved), logs[-6000:])
    print(json.dumps({"checkpoints_before_kill": sorted(saved), "trial_failures": failed,
                      "epochs_run": table["epochs_run"].tolist(), "restarts": table["restarts"].tolist()}))


@pytest.mark.timeout(600)
def test_annotate_job_loses_a_node_and_still_writes_one_row_per_file(cluster, tmp_path):
    """`ray job submit` of jobs/annotate.py with an actor on each worker node; one worker node is killed
    (its whole process group, raylet included) after the first committed batch. The job finishes on
    the surviving node alone with exactly one row per input file and no repeated segments."""
    archive = tmp_path / "archive"
    archive.mkdir()
    rng = np.random.default_rng(0)
    n_files = 24
    for i in range(n_files):
        sf.write(archive / f"rec{i:02d}.wav", (0.1 * rng.standard_normal(16_000 * 60)).astype(np.float32), 16_000)
    (archive / "notes.txt").write_text("not audio")
    bundle, out = _bundle(tmp_path / "bundle"), tmp_path / "labels"
    workers = cluster["workers"]()
    env = cluster["env"]
    job = subprocess.run(
        [RAY, "job", "submit", "--no-wait", "--working-dir", str(REPO), "--submission-id", "annotate-node-loss", "--",
         "python", "jobs/annotate.py", "--input", str(archive), "--output", str(out), "--bundle", bundle,
         "--batch-files", "1", "--num-actors", "2", "--hop-s", "0.5"],
        env=env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stdout + job.stderr

    def committed() -> int:
        return len(list((out / "files").glob("part-*.parquet"))) if (out / "files").exists() else 0

    # polled tightly: the kill must land while files are still being labelled
    _wait_while_running(env, "annotate-node-loss", lambda: committed() >= 1, "no batch was committed", poll_s=0.05)
    before = committed()
    workers[1].kill()  # a worker node dies mid-job
    assert before < n_files + 1, "the job finished before the node was killed"
    killed_at = time.time()

    text = _wait_for_end(env, "annotate-node-loss", killed_at, "the job did not finish after the node was lost")
    logs = _job_logs(env, "annotate-node-loss")
    assert "SUCCEEDED" in text, logs[-4000:]
    files, segments = ResultWriter(str(out)).read_tables()
    assert len(files) == n_files + 1 and files["uri"].is_unique, files[["uri", "status"]]
    assert (files["status"] == "ok").sum() == n_files, files[["uri", "status", "error"]]
    assert not segments.duplicated(["uri", "start_s", "end_s"]).any()
    actor_nodes = _actor_nodes(env, "annotate-node-loss", "MapWorker")
    assert {w.node_id for w in workers} <= actor_nodes, (actor_nodes, workers)  # an actor on each worker node
    # how the lost files were redone is not asserted: the pool is rebuilt after a lost-worker error
    # ("lost workers" in the log), or Ray Data restarts the lost actor elsewhere by itself (seen in
    # 2 of 4 full-suite runs this session); either way the rows below must be whole
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


@pytest.mark.timeout(600)
def test_two_worker_training_loses_a_node_and_resumes_from_its_checkpoint(cluster, s3_corpus, tmp_path):
    """jobs/train.py with two Ray Train workers (DDP over gloo) of 0.75 CPU each, so one runs on each
    worker node; data and checkpoints on S3. Once an epoch is checkpointed one worker node is killed; a
    new node joins (what an autoscaler does), and the worker group restarts from the last checkpoint:
    every epoch in the kept history once, in order, and the epochs after the kill not from epoch 0."""
    import yaml

    bucket, client = s3_corpus
    # an epoch takes ~1 s and Train registers a checkpoint on S3 a few epochs after writing it: enough
    # epochs that the kill lands mid-run (with 6, one full-suite run finished before it)
    epochs = 20
    config = {
        "family": "cnn", "hparams": {"width": 8}, "epochs": epochs, "batch_size": 8, "patience": 0,
        "num_workers": 2, "cpus_per_worker": 0.75, "max_failures": 2, "name": "ddp-node-loss",
        "storage_path": f"s3://{bucket}/train-ray",
        "data": {"corpus": "synthetic", "root": f"s3://{bucket}/corpus", "protocol": "kfold", "k": 3,
                 "test_fold": 0, "val_fraction": 0.25, "features": {"n_mels": 32, "window_s": 1.5},
                 "cache_root": f"s3://{bucket}/train-cache"},
    }
    config_path = REPO / ".cluster-train.yaml"  # inside the working dir the job is given
    config_path.write_text(yaml.safe_dump(config))
    workers = cluster["workers"]()
    env = cluster["env"]
    out = tmp_path / "train"
    try:
        job = subprocess.run([RAY, "job", "submit", "--no-wait", "--working-dir", str(REPO), "--submission-id",
                              "train-node-loss", "--", "python", "jobs/train.py", "--config", config_path.name,
                              "--out", str(out)], env=env, capture_output=True, text=True, timeout=120)
    finally:
        config_path.unlink()
    assert job.returncode == 0, job.stdout + job.stderr

    def checkpointed() -> bool:
        listed = client.list_objects_v2(Bucket=bucket, Prefix="train-ray/ddp-node-loss-folds-0/")
        return any(obj["Key"].endswith("checkpoint_manager_snapshot.json") for obj in listed.get("Contents", []))

    try:
        # an epoch Train has registered: what a restarted group resumes from
        _wait_while_running(env, "train-node-loss", checkpointed, "no checkpoint")
        workers[1].kill()  # one of the two Train workers dies with its node
        status = subprocess.run([RAY, "job", "status", "train-node-loss"], env=env, capture_output=True, text=True,
                                timeout=60)
        assert "SUCCEEDED" not in (status.stdout + status.stderr).upper(), "training ended before the kill"
        killed_at = time.time()
        time.sleep(3)
        cluster["workers"]()  # a replacement node: the group needs 2 x 0.75 CPU, one node has 1
        text = _wait_for_end(env, "train-node-loss", killed_at, "training did not finish after the node was lost")
    finally:
        subprocess.run([RAY, "job", "stop", "train-node-loss"], env=env, capture_output=True, timeout=120)
    assert "SUCCEEDED" in text, _job_logs(env, "train-node-loss")[-5000:]
    history = json.loads((out / "fold_0" / "history.json").read_text())
    done = [h["epochs_done"] for h in history]
    assert done == list(range(1, epochs + 1)), done  # every epoch once, in order: none redone, none lost
    restarts = [h["restarts"] for h in history]
    assert restarts[0] == 0 and restarts[-1] >= 1, restarts  # the group was restarted ...
    first_after = restarts.index(restarts[-1])
    assert first_after >= 1, restarts  # ... and went on from a checkpoint, not from epoch 0
    metrics = json.loads((out / "fold_0" / "metrics.json").read_text())
    assert metrics["epochs_run"] == epochs and 0.0 <= metrics["ua"] <= 1.0
    print(json.dumps({"restarts": restarts,
                      "first_epoch_after_restart": first_after}))


def _serve_replicas(env: dict, app: str) -> dict:
    """Per deployment of the Serve app ``app``: its status, target replica count and the node ids of its
    RUNNING replicas (Serve's details, through the dashboard)."""
    code = textwrap.dedent(f"""
        import json, os
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
        address = os.environ["RAY_API_SERVER_ADDRESS"]
        app = (ServeSubmissionClient(address).get_serve_details().get("applications") or {{}}).get({app!r}) or {{}}
        print("RESULT", json.dumps({{
            name: {{"status": d["status"], "target": d["target_num_replicas"],
                    "running": sorted(r["node_id"] for r in d["replicas"] if r["state"] == "RUNNING")}}
            for name, d in (app.get("deployments") or {{}}).items()}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return _result(out.stdout)


def _member_calls(temp_dir: str) -> int:
    """Model calls the member replicas of one node have answered, from their Serve logs there (Serve
    leaves replica methods out of the state API's task events)."""
    logs = Path(temp_dir, "session_latest", "logs", "serve").glob("replica_*_member-*.log")
    return sum(path.read_text(errors="replace").count("CALL logits OK") for path in logs)


def _noise(path: Path, seconds: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32), 16_000)
    return path


@pytest.mark.timeout(420)
def test_serve_replicas_on_both_worker_nodes_answer_like_offline_and_survive_losing_one(cluster, tmp_path, caplog):
    """`ser-ray serve --address` on the cluster with 2 ingress and 2 member replicas (0.25 CPU each, so
    all four fit on one worker node) and the HTTP proxy on the head: each deployment has a replica on
    each worker node, and /predict answers as the same bundle does offline. Then, while the project's
    endpoint client (bounded retries, honouring Retry-After) annotates an archive one file per request,
    one worker node's whole process group is SIGKILLed: every file still gets its ok row, Serve brings
    both deployments back to 2 RUNNING replicas, all on the surviving node, and /predict still answers
    as offline."""
    import logging
    import threading

    import httpx

    from ser_ray.annotate.core import AnnotateConfig, annotate_file
    from ser_ray.annotate.endpoint import annotate_via_endpoint
    from ser_ray.ensemble.bundle import load_bundle

    env, address = cluster["env"], cluster["address"]
    workers = cluster["workers"]()
    doomed, survivor = workers[1], workers[0]
    bundle = _bundle(tmp_path / "bundle")
    model = load_bundle(bundle)
    clip = _noise(tmp_path / "clip.wav", 12.0, seed=100)  # 24 windows: two member calls, sent at once
    offline_row, offline_segments = annotate_file(str(clip), model.predict_proba,
                                                  AnnotateConfig(window_s=model.window_s, hop_s=0.5))
    archive = tmp_path / "archive"
    archive.mkdir()
    n_files = 100  # 20 s each: 40 windows, 3 member calls per request (sent at once: both members busy)
    for i in range(n_files):
        _noise(archive / f"rec{i:02d}.wav", 20.0, seed=i)

    key, port = "cluster-serve-key-0123456789", free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = cluster["logs"] / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "ser_ray.cli", "serve", "--address", address, "--bundle", bundle,
         "--port", str(port), "--allow-root", str(archive), "--hop-s", "0.5",
         "--num-replicas", "2", "--num-cpus", "0.25", "--ingress-replicas", "2", "--ingress-num-cpus", "0.25",
         "--members", "deployments", "--proxy-location", "HeadOnly", "--member-timeout-s", "10", "--request-timeout-s", "60"],
        cwd=REPO, env={**env, "SER_RAY_API_KEY": key}, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    http = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"})

    def predicted() -> dict:
        r = http.post("/predict", files={"file": ("clip.wav", clip.read_bytes(), "audio/wav")})
        assert r.status_code == 200, r.text
        return r.json()

    def assert_like_offline(body: dict) -> None:
        assert body["label"] == offline_row["label"]
        for label in LABELS:
            assert body["probabilities"][label] == pytest.approx(offline_row[f"prob_{label}"], abs=1e-4)
        assert [(s["start_s"], s["label"]) for s in body["segments"]] == \
            [(s["start_s"], s["label"]) for s in offline_segments]
        for mine, theirs in zip(body["segments"], offline_segments):
            for label in LABELS:
                assert mine["probabilities"][label] == pytest.approx(theirs[f"prob_{label}"], abs=1e-4)

    def placed() -> dict:
        return {name: d["running"] for name, d in _serve_replicas(env, "ser-ray").items()
                if d["status"] == "HEALTHY" and len(d["running"]) == d["target"]}

    started = time.time()
    try:
        deadline = time.time() + 180
        while True:  # every replica RUNNING and the endpoint answering its health probe
            assert server.poll() is None, log_path.read_text()[-5000:]
            assert time.time() < deadline, f"Serve did not come up within 180 s:\n{log_path.read_text()[-5000:]}"
            running = placed()
            try:
                healthy = httpx.get(url + "/healthz", timeout=10).status_code == 200
            except httpx.TransportError:
                healthy = False
            if healthy and set(running) == {"ingress", "member-cnn"}:
                break
            time.sleep(2)
        up_s = time.time() - started
        for name, nodes in running.items():  # one replica on each worker node
            assert sorted(nodes) == sorted(w.node_id for w in workers), (name, nodes, workers)
        # answers equal offline, and each worker node's member computed part of them (Serve routes
        # each model call to the less busy member replica)
        answers, before_calls = 0, [_member_calls(w.temp_dir) for w in workers]

        def calls_since() -> list[int]:
            return [_member_calls(w.temp_dir) - before for w, before in zip(workers, before_calls)]

        while answers < 4 or min(calls_since()) == 0:
            assert answers < 20, f"20 answers, member calls per worker node {calls_since()}: {placed()}"
            assert_like_offline(predicted())
            answers += 1
        member_calls = calls_since()

        caplog.set_level(logging.WARNING, logger="ser_ray.annotate.endpoint")
        out = tmp_path / "labels"
        result: dict = {}

        def client():
            try:
                result["summary"] = annotate_via_endpoint(str(archive), str(out), url, batch_files=1,
                                                          concurrency=4, progress=False, retries=5,
                                                          timeout_s=90, api_key=key)
            except BaseException as exc:  # re-raised in the test thread
                result["error"] = exc

        loop = threading.Thread(target=client, daemon=True)
        loop.start()

        def committed() -> int:
            return len(list((out / "files").glob("part-*.parquet"))) if (out / "files").exists() else 0

        deadline = time.time() + 120
        while committed() < 8 and loop.is_alive():
            assert time.time() < deadline, "the client committed no 8 files within 120 s"
            time.sleep(0.05)
        before = committed()
        doomed.kill()  # a worker node (raylet, workers, its replicas) dies under load
        killed_at = time.time()
        assert before < n_files, "the client finished before the node was killed"

        deadline = killed_at + 120
        while True:  # both deployments back at 2 RUNNING replicas, all on the surviving node
            assert time.time() < deadline, f"replicas not back on the surviving node within 120 s: {placed()}"
            running = placed()
            if set(running) == {"ingress", "member-cnn"} and \
                    all(set(n) == {survivor.node_id} for n in running.values()):
                break
            time.sleep(1)
        back_s = time.time() - killed_at
        sending_when_back = loop.is_alive()
        loop.join(timeout=max(1.0, killed_at + 150 - time.time()))
        assert not loop.is_alive(), "the client did not finish within 150 s of the kill"
        assert "error" not in result, repr(result.get("error"))  # no request gave up
        files, segments = ResultWriter(str(out)).read_tables()
        assert len(files) == n_files and files["uri"].is_unique
        assert (files["status"] == "ok").all(), files.loc[files["status"] != "ok", ["uri", "status", "error"]]
        assert result["summary"]["n_ok"] == n_files
        assert not segments.duplicated(["uri", "start_s", "end_s"]).any()
        retries = [r.getMessage() for r in caplog.records if r.name == "ser_ray.annotate.endpoint"
                   and "retry" in r.getMessage()]
        assert server.poll() is None, log_path.read_text()[-5000:]  # the driver lives on the head
        for _ in range(4):
            assert_like_offline(predicted())
        print(json.dumps({"serve_up_s": round(up_s, 1), "predict_answers": answers,
                          "member_calls_per_worker_node": member_calls, "committed_before_kill": before,
                          "files": n_files, "posts": n_files + len(retries), "retries": len(retries),
                          "retry_reasons": retries[:6], "replicas_back_s": round(back_s, 1),
                          "client_s": round(result["summary"]["wall_s"], 1),
                          "client_sending_when_back": sending_when_back}))
    finally:
        http.close()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)  # ser-ray serve shuts Serve down on SIGTERM
            try:
                server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                _stop(server, signal.SIGKILL)
        if server.returncode != 0:  # its own shutdown did not run: shut Serve down from here
            code = (f"import ray; from ray import serve; ray.init(address={address!r}, log_to_driver=False); "
                    "serve.shutdown()")
            subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
