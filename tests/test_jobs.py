"""`ray job submit` against a real local Ray head (its own ports and temp dir): jobs/pipeline.py, then the
user's own commands on what it left (`ser-ray ensemble --from EXPERIMENT`, `ser-ray annotate`); and the
README's own job commands, run as written in a copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import re

import pandas as pd
import pytest
import yaml

from conftest import free_port, ray_node_env
from ser_ray.annotate.writer import ResultWriter

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` in a subprocess; stopped by its pid (never a machine-wide ``ray stop``).

    Ray 2.60 turns token auth on for ``ray start --head`` once ``~/.ray/auth_token`` exists, so the head
    and every client here run with ``RAY_AUTH_MODE=token`` (the same token file), as a user would.
    """
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = ray_node_env()
    cmd = [
        RAY, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0", f"--port={port}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp_dir}", "--object-store-memory=300000000", "--disable-usage-stats",
    ]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dash}"
    client_env = {**env, "RAY_API_SERVER_ADDRESS": address}
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert head.poll() is None, f"ray start failed: {head.stdout.read()[-3000:]}"
            ok = subprocess.run([RAY, "job", "list"], env=client_env, capture_output=True, text=True, timeout=60)
            if ok.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("the Ray head's job server did not come up within 120 s")
        yield client_env
    finally:
        head.terminate()  # --block: the ray start process stops the node's processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(600)
def test_pipeline_job_runs_under_ray_job_submit_and_resumes(ray_head, tmp_path):
    from ser_ray.corpora.synthetic import generate

    corpus = tmp_path / "synthetic"
    generate(corpus, actors=8, seed=0, sentences=["TIE", "IOM"], emotions=["neutral", "anger", "happiness", "sadness"],
             workers=1, progress=False)
    incoming = tmp_path / "incoming"  # an archive to label with the bundle the job builds
    incoming.mkdir()
    for i, clip in enumerate(sorted(corpus.rglob("*.wav"))[:3]):
        shutil.copy(clip, incoming / f"rec{i}.wav")
    (incoming / "notes.txt").write_text("not audio")
    config = {
        "name": "job-tune",
        "data": {"corpus": "synthetic", "root": str(corpus), "protocol": "kfold", "k": 4, "test_fold": 0,
                 "val_fraction": 0.25, "features": {"n_mels": 32, "window_s": 1.5},
                 "speed_perturb": [1.1]},  # logreg trials train on copies; cnn and bigru_attn ignore them
        "families": ["cnn", "bigru_attn", "logreg"],
        "num_samples": 5, "max_epochs": 2, "grace_period": 1, "reduction_factor": 2,
        "max_concurrent_trials": 2, "seed": 0, "tpe_startup_trials": 2,
        "resources": {"cnn": {"cpu": 0.75}, "bigru_attn": {"cpu": 0.75}, "logreg": {"cpu": 0.75}},
        "train": {"patience": 0, "batch_size": 16},
        "space": {"cnn": {"hparams": {"width": {"choice": [8, 16]}}},
                  "bigru_attn": {"hparams": {"hidden": {"choice": [16, 32]}, "layers": 1}}},
        "annotate": {"input": str(incoming), "hop_s": 1.5},
    }
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"

    def submit(submission_id: str) -> str:
        done = subprocess.run(
            [RAY, "job", "submit", "--working-dir", str(REPO), "--submission-id", submission_id, "--",
             "python", "jobs/pipeline.py", "--config", str(config_path), "--out", str(out)],
            env=ray_head, capture_output=True, text=True, timeout=420,
        )
        logs = done.stdout + done.stderr
        status = subprocess.run([RAY, "job", "status", submission_id], env=ray_head, capture_output=True, text=True,
                                timeout=60)
        status_text = status.stdout + status.stderr  # the CLI logs the status line to stderr
        assert done.returncode == 0 and "succeeded" in status_text.lower(), \
            f"job did not succeed ({status_text.strip()}):\n{logs[-5000:]}"
        return logs

    logs = submit("pipeline-1")
    assert "[1/3] search" in logs and "[2/3] ensemble" in logs and "[3/3] annotate" in logs
    assert "trial 5/5" in logs  # one line per finished trial, not Tune's tables
    experiment = out / "job-tune"
    files, _ = ResultWriter(str(experiment / "annotations")).read_tables()
    assert len(files) == 4 and (files["status"] == "ok").sum() == 3
    assert (experiment / "annotations" / "archive.html").read_text().count('class="file"') == 4
    again = submit("pipeline-2")  # finished stages are skipped, the archive is not labelled twice
    assert again.count("skipped:") == 2 and "4 already done" in again

    experiment = out / "job-tune"
    table = pd.read_parquet(experiment / "trials.parquet")
    assert len(table) == 5 and set(table["family"]) == {"cnn", "bigru_attn", "logreg"}  # each family's default
    assert (table["epochs_run"] <= 2).all() and (table["status"] == "ok").all()
    assert pd.read_csv(experiment / "trials.csv")["trial_id"].tolist() == table["trial_id"].tolist()
    best = json.loads((experiment / "best.json").read_text())
    families = [f for f in best if not f.startswith("_")]
    assert "logreg" in families and set(families) <= set(table["family"])
    logreg = table[table["family"] == "logreg"]
    assert (logreg["stop_reason"] == "completed").all() and (logreg["epochs_run"] == 1).all()  # one fit, no epochs
    for trial_id in logreg["trial_id"]:  # a copy of every training clip, none of the validation clips
        fit = json.loads((experiment / "train" / f"train-{trial_id}" / "fit.json").read_text())
        assert fit["n_copies"] == fit["n_train"] > 0
    from ser_ray.models import load_model

    for family in families:
        entry = best[family]
        assert entry["trial_id"] in set(table["trial_id"])
        assert 0.0 <= entry["val"]["ua"] <= 1.0 and 0.0 <= entry["test"]["ua"] <= 1.0
        model, meta = load_model(entry["checkpoint_path"])
        assert meta.family == family
    assert (experiment / "search_curves.png").stat().st_size > 0

    # the user's own path on: the experiment alone names the models and the split to ensemble them on
    from ser_ray.cli import main

    split = pd.read_parquet(experiment / "split.parquet")
    sides = {name: set(split.loc[split["split"] == name, "speaker"]) for name in ("train", "val", "test")}
    assert all(sides.values()) and not (sides["train"] & sides["val"] or sides["train"] & sides["test"]
                                        or sides["val"] & sides["test"])
    bundle = tmp_path / "bundle"
    assert main(["ensemble", "--from", str(experiment), "--out", str(bundle)]) == 0
    metrics = json.loads((bundle / "ensemble_metrics.json").read_text())
    assert metrics["test"]["ensemble"]["ua"] >= 0.0
    assert len(json.loads((bundle / "bundle.json").read_text())["members"]) == len(families)
    archive = tmp_path / "archive"
    archive.mkdir()
    for path in split[split["split"] == "test"]["path"][:3]:
        (archive / Path(path).name).write_bytes(Path(path).read_bytes())
    labels = tmp_path / "labels"
    assert main(["annotate", "--input", str(archive), "--output", str(labels), "--bundle", str(bundle),
                 "--batch-files", "2"]) == 0
    files, _ = ResultWriter(str(labels)).read_tables()
    assert len(files) == 3 and (files["status"] == "ok").all()
    assert (labels / "archive.html").read_text().count('class="file"') == 3
    # a user error is one line and exit code 2, not a traceback
    assert main(["ensemble", "--from", str(experiment), "--out", str(tmp_path / "b2"),
                 "--manifest", str(tmp_path / "missing.parquet")]) == 2


def test_jobs_refuse_relative_paths_that_break_under_working_dir(tmp_path):
    """`ray job submit --working-dir .` runs the job in an uploaded copy without git-ignored data/;
    `--root data/synthetic` was a FileNotFoundError traceback, a relative --out a lost result."""
    import json as _json

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "t.yaml").write_text("name: t\ndata: {corpus: synthetic}\nfamilies: [logreg]\n")
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "RAY_JOB_CONFIG_JSON_ENV_VAR": _json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}})}

    def job(*args):
        return subprocess.run([sys.executable, str(REPO / "jobs" / "tune.py"), "--config", "configs/t.yaml", *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    missing = job("--root", "data/synthetic", "--out", str(tmp_path / "out"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "data/synthetic: not in the job's uploaded working directory" in missing.stderr
    relative_out = job("--root", str(tmp_path), "--out", "results/tune")
    assert relative_out.returncode == 2 and "deleted with it" in relative_out.stderr


def readme_job_lines() -> list[str]:
    """The commands of the README's "Jobs on a Ray cluster" block, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Jobs on a Ray cluster"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.strip() for line in re.sub(r"\\\n\s*", " ", block).splitlines()
            if line.strip() and not line.strip().startswith("#")]


@pytest.mark.timeout(600)
def test_readme_job_commands_run_as_written(ray_head, tmp_path):
    """The local-head part of the README's job block, word for word, from a copy of the repository
    with `ser-ray synth`'s corpus in data/. To fit CI, the copy's corpus is small (10 actors, 2
    sentences) and its configs/tune-synthetic.yaml searches 2 trials (each family's default config,
    side by side) of 2 epochs (12 of up to 8 as shipped: about 10 minutes on 2 CPUs); every other
    setting and the commands are as shipped. (With the test session's own local Ray beside the head,
    trials queued behind finished ones never started: the README's "one local Ray per machine".) Left
    out: `ray start` and `export` (the fixture's head has its own ports), the demo job (its `small`
    budget takes minutes; the same code runs in `ser-ray demo`) and the AWS lines."""
    from ser_ray.corpora.synthetic import generate

    lines = readme_job_lines()
    tune = [line for line in lines if line.startswith("ray job submit") and "jobs/tune.py" in line
            and "tune-synthetic" in line]
    ensemble = [line for line in lines if line.startswith("ser-ray ensemble --from")]
    assert len(tune) == 1 and len(ensemble) == 1, lines
    repo = tmp_path / "repo"  # what a user has after `git clone`: tracked files, no data/ or results/
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    config_path = repo / "configs" / "tune-synthetic.yaml"
    config = yaml.safe_load(config_path.read_text())
    config.update(num_samples=2, max_epochs=2, grace_period=1)
    config_path.write_text(yaml.safe_dump(config))
    generate(repo / "data" / "synthetic", actors=10, seed=0, sentences=["TIE", "IOM"], workers=1, progress=False)
    env = {**ray_head, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "PWD": str(repo)}

    def run(line: str) -> str:
        log = tmp_path / "command.log"
        with log.open("w") as out:
            try:
                code = subprocess.run(["bash", "-c", line], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=400).returncode
            except subprocess.TimeoutExpired:
                code = "timeout (400 s)"
        logs = log.read_text()
        assert code == 0 and "Traceback" not in logs, f"{line}\nexit {code}:\n{logs[-5000:]}"
        return logs

    logs = run(tune[0])
    assert "succeeded" in logs.lower()
    experiment = repo / "results" / "tune" / "tune-synthetic"
    best = json.loads((experiment / "best.json").read_text())
    assert {"cnn", "bigru_attn"} <= set(best) and (experiment / "split.parquet").exists()
    assert len(pd.read_parquet(experiment / "trials.parquet")) == 2
    run(ensemble[0])
    bundle = json.loads((repo / "results" / "bundle" / "bundle.json").read_text())
    assert sorted(m["name"] for m in bundle["members"]) == ["bigru_attn", "cnn"]
    metrics = json.loads((repo / "results" / "bundle" / "ensemble_metrics.json").read_text())
    assert 0.0 <= metrics["test"]["ensemble"]["ua"] <= 1.0
    assert (repo / "results" / "bundle" / "ensemble_test_confusion.png").stat().st_size > 0


def test_a_finished_search_is_compared_with_the_config_before_it_is_skipped():
    from ser_ray.pipeline import config_changes
    from ser_ray.tune.config import SearchConfig

    saved = json.loads(json.dumps(SearchConfig(families=["logreg"], num_samples=4).to_dict(), default=str))
    same_results = SearchConfig(families=["logreg"], num_samples=4, max_concurrent_trials=8,
                                resources={"logreg": {"cpu": 2}}, storage_path="/elsewhere")
    assert config_changes(saved, same_results) == []  # where trials run does not change what they find
    other = SearchConfig(families=["logreg", "svm"], num_samples=6, data={"features": {"n_mels": 32}})
    assert config_changes(saved, other) == ["data.features.n_mels", "families", "num_samples"]
    assert config_changes(None, other) == []  # an experiment from before configs were saved


def test_gpu_check_exits_cleanly_where_there_is_no_cuda():
    """benchmarks/gpu_check.py runs unchanged on any machine: without CUDA it says so and exits 0."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: run benchmarks/gpu_check.py itself")
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.startswith("no CUDA"), out.stdout + out.stderr[-2000:]
