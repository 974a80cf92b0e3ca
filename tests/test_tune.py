"""The search machinery on toy objectives (same Tuner construction as real searches), resume, cluster.yaml."""

from __future__ import annotations

import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import ray.cloudpickle
import yaml
from ray import tune

from ser_ray.tune import space as spaces
from ser_ray.tune.config import SearchConfig
from ser_ray.tune.results import mark_default_trials, results_table
from ser_ray.tune.search import build_tuner, default_points, restore_tuner

REPO = Path(__file__).resolve().parents[1]
# Ray workers cannot import this test module: ship its toy trainables by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def quadratic(config):
    """One report: the closer x is to 0.3, the better."""
    x = config["toy"]["x"]
    tune.report({"val_ua": -((x - 0.3) ** 2), "x": x, "epochs_done": 1})


def learning_curve(config):
    """Per-epoch reports of a curve whose ceiling is the config's quality: ASHA can rank early."""
    quality = config["toy"]["quality"]
    for epoch in range(1, 7):
        tune.report({"val_ua": quality * (1 - 0.5**epoch), "val_wa": quality, "val_macro_f1": quality,
                     "epochs_done": epoch})
        time.sleep(0.05)


def toy_config(tmp_path, **kw) -> SearchConfig:
    return SearchConfig(name=kw.pop("name", "toy"), storage_path=str(tmp_path), families=["cnn"], **kw)


def test_optuna_sampler_learns_from_results(ray_session, tmp_path):
    # one trial at a time: TPE sees every result before it proposes the next x (deterministic for a seed)
    cfg = toy_config(tmp_path, num_samples=12, max_epochs=1, grace_period=1, max_concurrent_trials=1,
                     tpe_startup_trials=4, seed=0)
    space_fn = spaces.define_by_run({"toy": {"x": tune.uniform(0.0, 1.0)}})
    grid = build_tuner(quadratic, space_fn, cfg).fit()

    results = sorted((r for r in grid if r.metrics), key=lambda r: r.metrics["timestamp"])
    assert len(results) == 12 and all(r.error is None for r in results)
    errors = [abs(r.config["toy"]["x"] - 0.3) for r in results]
    random_phase, tpe_last = statistics.median(errors[:4]), statistics.median(errors[-4:])
    # TPE saw the reported values: its last proposals sit much closer to the optimum than the random ones.
    assert tpe_last < 0.5 * random_phase and tpe_last < 0.1, errors


def test_asha_stops_weak_trials_early(ray_session, tmp_path):
    cfg = toy_config(tmp_path, num_samples=8, max_epochs=6, grace_period=1, reduction_factor=2,
                     max_concurrent_trials=2, tpe_startup_trials=8)
    space_fn = spaces.define_by_run({"toy": {"quality": tune.uniform(0.0, 1.0)}})
    table = results_table(build_tuner(learning_curve, space_fn, cfg).fit(), cfg)

    assert len(table) == 8 and (table["status"] == "ok").all()
    stopped = table[table["stopped_early"]]
    assert len(stopped) >= 2, table[["trial_id", "epochs_run", "stop_reason"]]
    assert (stopped["stop_reason"] == "asha").all() and (stopped["epochs_run"] < 6).all()
    # the best trial ran to the end, and it beats every trial ASHA stopped
    best = table.loc[table["best_val_ua"].idxmax()]
    assert best["epochs_run"] == 6 and not best["stopped_early"]
    assert json.loads(best["config"])["quality"] > stopped["best_val_wa"].max()


def test_define_by_run_conditional_space_and_yaml_override():
    space = spaces.family_space("cnn", {"lr": {"loguniform": [1e-4, 1e-2]}, "hparams": {"width": 24, "dropout": None}})
    assert space["hparams"] == {"width": 24} and space["lr"].upper == 1e-2
    assert "hparams" in spaces.DEFAULT_SPACES["cnn"] and "dropout" in spaces.DEFAULT_SPACES["cnn"]["hparams"]

    import optuna

    fn = spaces.define_by_run({"cnn": space, "bigru_attn": spaces.family_space("bigru_attn")})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(8):
        trial = study.ask()
        constants = fn(trial)
        family = trial.params["family"]
        seen.add(family)
        assert constants["family"] == family
        # only the chosen family's parameters are sampled
        assert all(k == "family" or k.startswith(family + "/") for k in trial.params)
        if family == "cnn":
            assert constants["cnn/hparams/width"] == 24 and "cnn/hparams/dropout" not in trial.params
    assert seen == {"cnn", "bigru_attn"}
    with pytest.raises(ValueError, match="loguniform needs"):
        spaces.family_space("cnn", {"lr": {"loguniform": [1e-4]}})


def test_default_points_mark_the_baseline_trial_of_each_family():
    cfg = SearchConfig(families=["cnn", "bigru_attn"], space={"cnn": {"hparams": {"width": {"choice": [16, 32]}}}})
    points = default_points(cfg)
    cnn = next(p for p in points if p["family"] == "cnn")
    assert cnn["cnn/lr"] == 1e-3 and cnn["cnn/hparams/width"] == 32  # TrainConfig / CNNHparams defaults
    import pandas as pd

    rows = []
    for trial, (lr, width) in enumerate([(1e-3, 32), (3e-3, 32), (1e-3, 16)]):
        row = {"trial_id": f"t{trial}", "family": "cnn", "best_val_ua": 0.5 + trial / 10}
        row.update({f"param/{k.split('/', 1)[1]}": v for k, v in cnn.items() if k != "family"})
        row.update({"param/lr": lr, "param/hparams/width": width})
        rows.append(row)
    rows.append({"trial_id": "t3", "family": "bigru_attn", "best_val_ua": 0.4,
                 **{f"param/{k.split('/', 1)[1]}": v for k, v in points[1].items() if k != "family"}})
    marked = mark_default_trials(pd.DataFrame(rows), points)
    assert marked["is_default"].tolist() == [True, False, False, True]


RESUME_SCRIPT = textwrap.dedent("""
    import sys, time, ray
    from pathlib import Path
    from ray import tune
    from ser_ray.tune import space as spaces
    from ser_ray.tune.config import SearchConfig
    from ser_ray.tune.search import build_tuner

    def slow(config):
        marker = Path(config["toy"]["marker"])
        with marker.open("a") as f:
            f.write(tune.get_context().get_trial_id() + "\\n")
        # from the third trial on, run long enough that the test's Ctrl-C lands while it runs
        # (a 1 s trial could finish, and the fourth start, before Tune handles the signal)
        time.sleep(1.0 if len(marker.read_text().split()) <= 2 else 60.0)
        tune.report({"val_ua": config["toy"]["x"], "epochs_done": 1})

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    cfg = SearchConfig(name="resume", storage_path=sys.argv[1], families=["cnn"], num_samples=4,
                       max_epochs=1, grace_period=1, max_concurrent_trials=1)
    space_fn = spaces.define_by_run({"toy": {"x": tune.uniform(0, 1), "marker": sys.argv[2]}})
    build_tuner(slow, space_fn, cfg).fit()
""")


def slow(config):
    """The resumed side of RESUME_SCRIPT's ``slow`` (Tune checks the trainable's name on restore)."""
    with Path(config["toy"]["marker"]).open("a") as f:
        f.write(tune.get_context().get_trial_id() + "\n")
    tune.report({"val_ua": config["toy"]["x"], "epochs_done": 1})


def test_resume_runs_only_the_remaining_trials(ray_session, tmp_path):
    marker = tmp_path / "started.txt"  # one line per trial start
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(marker)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        # one trial at a time: a third start means two trials have finished
        while time.time() < deadline and proc.poll() is None:
            if marker.exists() and len(marker.read_text().split()) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the search ended before it could be interrupted: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGINT)  # a user's Ctrl-C: Tune saves the experiment state and exits
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    path = str(tmp_path / "resume")
    before = tune.ExperimentAnalysis(path)
    finished_before = {t.trial_id for t in before.trials if t.status == "TERMINATED"}
    assert 2 <= len(finished_before) < 4, [(t.trial_id, t.status) for t in before.trials]
    started_before = marker.read_text().split()

    assert tune.Tuner.can_restore(path)
    grid = restore_tuner(path, slow).fit()

    ids = [r.metrics["trial_id"] for r in grid if r.metrics]
    assert len(grid) == 4 and len(set(ids)) == 4 and all(r.error is None for r in grid)
    rerun = set(marker.read_text().split()[len(started_before):])
    # only the unfinished trials ran again (or for the first time); finished ones were kept
    assert rerun and not (rerun & finished_before), (finished_before, rerun)
    assert rerun | finished_before == set(ids)


def test_cluster_yaml_validates_against_the_autoscaler_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)

    nodes = prepared["available_node_types"]
    assert nodes[prepared["head_node_type"]]["node_config"]["InstanceType"] == "m5.xlarge"
    assert nodes["gpu_worker"]["node_config"]["InstanceType"] == "g4dn.xlarge"
    assert nodes["gpu_worker"]["resources"] == {"CPU": 4, "GPU": 1}
    assert nodes["gpu_worker"]["min_workers"] == 0 < nodes["gpu_worker"]["max_workers"]
    assert nodes["gpu_worker_4x"]["resources"]["GPU"] == 4
    assert any("pip install" in c and "ser-ray" in c for c in prepared["setup_commands"])

    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["resources"] = "GPU: 1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
