"""Several model families cross-validated the same way, side by side in one table and one chart.

``run_compare(config, families, out)`` runs :func:`ser_ray.train.cv.run_cv` once per family (same
data, protocol, folds, seed, epochs) into ``out/<family>/`` and writes::

    comparison.csv   family, UA/WA/macro-F1 mean and std over folds, parameters, training seconds per
                     epoch, inference ms per clip (CPU), folds, result directory
    comparison.md    the same table, metrics as ``mean ± std``
    comparison.png   UA / WA / macro-F1 per family with the std over folds as error bars
    cache/           the feature caches, shared by families with the same feature config

Inference time is measured here, on CPU, by re-running each fold's saved model over that fold's test
clips (one warm-up batch first), so it does not depend on where training ran.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ser_ray.artefacts import CvResult
from ser_ray.train.config import TrainConfig

log = logging.getLogger(__name__)

METRICS = ("ua", "wa", "macro_f1")
METRIC_NAMES = {"ua": "UA", "wa": "WA", "macro_f1": "macro-F1"}
INFER_BATCH = 64


def family_config(config: TrainConfig, family: str, hparams: dict | None = None) -> TrainConfig:
    """``config`` for ``family``: ``hparams`` (default: ``config.hparams`` for ``config.family``, the
    family's defaults for any other) and, when ``config.scheduler`` is the automatic choice for
    ``config.family``, the family's automatic one."""
    if hparams is None:
        hparams = config.hparams if family == config.family else {}
    auto = TrainConfig(family=config.family).scheduler
    plain = {**config.to_dict(), "family": family, "hparams": dict(hparams),
             "scheduler": None if config.scheduler == auto else config.scheduler}
    return TrainConfig.from_dict(plain)


def model_costs(result_dir: str | Path, summary: dict) -> dict:
    """Parameters, mean training seconds per epoch and CPU inference ms per clip of a cv result."""
    import torch

    from ser_ray.features.pipeline import features_array, load_cache_pandas
    from ser_ray.models import load_model
    from ser_ray.train.evaluate import predict_proba

    result_dir = Path(result_dir)
    cache = load_cache_pandas(summary["feature_cache"], columns=["path", "features", "error"])
    params, epoch_s, infer_s, clips = None, [], 0.0, 0
    for fold in summary["folds_run"]:
        fold_dir = CvResult(result_dir).fold_dir(fold)
        model, _ = load_model(str(fold_dir / "model"), map_location="cpu")
        params = int(sum(p.numel() for p in model.parameters()))
        history = json.loads((fold_dir / "history.json").read_text())
        epoch_s += [h["epoch_s"] for h in history if "epoch_s" in h]
        paths = pd.read_parquet(fold_dir / "predictions.parquet", columns=["path"])["path"]
        features = features_array(cache[cache["path"].isin(paths) & cache["error"].isna()])
        predict_proba(model, features[:INFER_BATCH], INFER_BATCH, "cpu")  # warm-up (allocations, kernels)
        start = time.perf_counter()
        predict_proba(model, features, INFER_BATCH, "cpu")
        infer_s += time.perf_counter() - start
        clips += len(features)
    return {
        "params": params,
        "train_s_per_epoch": float(np.mean(epoch_s)) if epoch_s else float("nan"),
        "infer_ms_per_clip": 1000.0 * infer_s / max(clips, 1),
        "infer_clips": clips,
        "infer_threads": torch.get_num_threads(),
    }


def parse_family_spec(spec: str) -> tuple[str, str, dict]:
    """``svm:kernel=rbf,C=0.1`` -> ``("svm-kernel=rbf-C=0.1", "svm", {"kernel": "rbf", "C": 0.1})``.

    A plain family name gives itself and no hyperparameters; values are parsed as YAML.
    """
    import yaml

    family, _, rest = spec.strip().partition(":")
    hparams = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        if "=" not in item:
            raise ValueError(f"family spec {spec!r}: expected FAMILY:key=value[,key=value], e.g. svm:kernel=rbf")
        key, value = item.split("=", 1)
        hparams[key.strip()] = yaml.safe_load(value)
    name = "-".join([family] + [f"{k}={v}" for k, v in hparams.items()])
    return name, family, hparams


def run_compare(config: TrainConfig, families: list[str], out: str | Path, *, max_folds: int | None = None,
                hparams: dict[str, dict] | None = None, ensemble: bool = False,
                self_train: bool = False) -> pd.DataFrame:
    """Cross-validate each of ``families`` like ``config`` into ``out/<name>``; write and return the table.

    An entry of ``families`` is a family name or ``FAMILY:key=value,...`` (its hyperparameters, e.g.
    ``svm:kernel=rbf``); ``hparams`` maps a name to hyperparameters too (default: the family's
    defaults). With ``ensemble``, each fold's members are combined into a per-fold ensemble (weights
    and temperatures fitted on held-out predictions of the fold's non-test speakers, see
    :func:`fold_ensembles`) and the table gets an ``ensemble`` row. ``self_train`` (classical members
    and ``normalise_by: speaker`` only) adds an ``ensemble + self-training`` row: each fold's ensemble
    self-trained on its test speakers' unlabelled clips (``ser_ray.train.self_train``). A rerun reuses
    finished folds (see ``run_cv``).
    """
    from ser_ray.models import MODELS
    from ser_ray.train.cv import run_cv

    entries = [parse_family_spec(f) for f in families]
    unknown = [family for _, family, _ in entries if family not in MODELS]
    if unknown or not entries:
        raise ValueError(f"families {unknown or families}: choose one or more of {sorted(MODELS)}")
    if len({name for name, _, _ in entries}) < len(entries):
        raise ValueError(f"families {families}: each entry must be different")
    if self_train:
        from ser_ray.models.classical import is_classical

        if not ensemble:
            raise ValueError("self-training adapts the per-fold ensemble: it needs ensemble=True (--ensemble)")
        deep = [family for _, family, _ in entries if not is_classical(family)]
        if deep:
            raise ValueError(f"self-training refits every member per test speaker; {deep} are not classical families")
        if config.data.normalise_by != "speaker":
            raise ValueError("self-training reads the test speakers' unlabelled clips, as speaker normalisation "
                             "does: it needs data.normalise_by=speaker")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    # one cache root: families that read the same features share one cache
    data = dataclasses.replace(config.data, cache_root=config.data.cache_root or str(out / "cache"))
    rows, summaries = [], {}
    for i, (name, family, spec_hparams) in enumerate(entries):
        log.info("compare: family %d/%d %s", i + 1, len(entries), name)
        hp = {**((hparams or {}).get(name) or {}), **spec_hparams} or None
        cfg = dataclasses.replace(family_config(config, family, hp), data=data)
        summaries[name] = summary = run_cv(cfg, out / name, max_folds=max_folds)
        row = {"family": name, **_score_cells(summary)}
        row.update(model_costs(out / name, summary), folds=len(summary["folds_run"]), result_dir=str(out / name))
        rows.append(row)
    if ensemble:
        features = copies = None
        if self_train:  # the features each member was fitted on, and those of its training clips' copies
            features = _features_by_path(config, data, summaries)
            copies = {speed: _features_by_path(config, data, summaries, speed) for speed in data.speed_perturb}
        result = fold_ensembles(out, list(summaries), summaries[entries[0][0]]["labels"], features, copies)
        row = {"family": "ensemble", **_score_cells(result)}
        row.update(params=sum(r["params"] or 0 for r in rows), train_s_per_epoch=float("nan"),
                   infer_ms_per_clip=sum(r["infer_ms_per_clip"] for r in rows), folds=len(result["folds"]),
                   result_dir=str(out / "ensemble"))
        rows += [row, dict(row, family="ensemble (uniform)", **_score_cells(result["uniform"]))]
        if "self_trained" in result:
            rows.append(dict(row, family="ensemble + self-training", **_score_cells(result["self_trained"])))
    table = pd.DataFrame(rows)
    table.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(comparison_markdown(table, config))
    plot_comparison(table, out / "comparison.png",
                    title=f"{config.data.corpus_name} {config.data.protocol}"
                    + (" + speaker norm" if config.data.speaker_norm else "")
                    + f", {int(table['folds'].max())} fold(s)")
    log.info("compare: %d families -> %s", len(table), out / "comparison.csv")
    return table


def _score_cells(scores: dict) -> dict:
    """Table cells ``{ua_mean, ua_std, wa_mean, ...}`` from a summary's ``{ua: {mean, std}, ...}``."""
    return {f"{key}_{stat}": scores[key][stat] for key in METRICS for stat in ("mean", "std")}


def _prefixed_scores(per_fold: list[dict], prefix: str) -> dict:
    """``{ua: {mean, std, values}, ...}`` over the folds' ``<prefix>_ua``, ``<prefix>_wa``, ... metrics."""
    from ser_ray.train.metrics import summarize_folds

    scores = summarize_folds(per_fold, keys=tuple(f"{prefix}_{key}" for key in METRICS))
    return {key: scores[f"{prefix}_{key}"] for key in METRICS}


def _features_by_path(config: TrainConfig, data, summaries: dict, speed: float = 1.0) -> dict[str, dict[str, np.ndarray]]:
    """member name -> path -> the (speaker-normalised) features the member was fitted on, or those of
    the clip's copy at ``speed`` (members may read different features: each feature config is loaded
    once from the cache)."""
    from ser_ray.features.config import FeatureConfig
    from ser_ray.features.pipeline import features_array
    from ser_ray.train.data import feature_rows, label_mapped, load_manifest

    manifest, _ = label_mapped(load_manifest(config), config.label_map)
    by_config: dict[str, dict[str, np.ndarray]] = {}
    for summary in summaries.values():
        key = json.dumps(summary["feature_config"], sort_keys=True)
        if key not in by_config:
            feature_config = dataclasses.replace(FeatureConfig.from_dict(summary["feature_config"]), speed=speed)
            rows, _ = feature_rows(manifest, feature_config, data.cache_root, speaker_norm=data.speaker_norm)
            rows = rows[rows["error"].isna()] if "error" in rows else rows
            by_config[key] = dict(zip(rows["path"], features_array(rows)))
    return {name: by_config[json.dumps(s["feature_config"], sort_keys=True)] for name, s in summaries.items()}


def fold_ensembles(out: Path, names: list[str], labels: list[str],
                   features: dict[str, dict[str, np.ndarray]] | None = None,
                   copies: dict[float, dict[str, dict[str, np.ndarray]]] | None = None) -> dict:
    """Per fold, an ensemble of the members ``out/<name>/fold_<i>``; written to ``out/ensemble/``.

    On held-out predictions of each fold's non-test speakers one temperature per member, then simplex
    weights, are fitted by likelihood (or equal weights chosen, see ``calibration.choose_weights``),
    exactly as ``ser-ray ensemble`` fits a bundle; the weighted
    mixture is then scored on the fold's test speakers. Held out means predicted by a model that did
    not train on the clip: the validation speakers (``val_predictions.parquet``) when any member is a
    deep family, every training speaker when all members are classical (their inner cross-validation's
    ``oof_predictions.parquet``: one validation speaker is a noisy judge of weights). Folds every member
    finished are used. Returns the summary (``summary.json``).

    ``features`` (member name -> path -> that member's features of every clip; classical members only)
    also self-trains each fold's ensemble on its test speakers' unlabelled clips (``ser_ray.train.self_train``, the
    threshold chosen on the fold's training speakers, folds as Ray tasks): each fold then records
    ``self_train`` and its ``self_trained_ua``, and the summary a ``self_trained`` block. ``copies``
    (speed -> the same mapping for the clips' speed-perturbed copies) join every refit's training rows,
    as they joined the members' own fits.
    """
    from scipy.special import softmax

    from ser_ray.calibration import choose_weights, fit_temperature, label_ids
    from ser_ray.train.metrics import classification_metrics, summarize_folds

    ens_dir = out / "ensemble"
    ens_dir.mkdir(parents=True, exist_ok=True)
    prob_cols = [f"prob_{label}" for label in labels]
    fold_sets = [CvResult(out / n).folds_with("val_predictions.parquet") for n in names]
    folds = sorted(set.intersection(*fold_sets)) if fold_sets else []
    if not folds:
        raise ValueError(f"no fold has validation predictions from every member of {names}")
    per_fold, to_self_train = [], []
    for fold in folds:
        val, test = [], []
        for name in names:
            d = CvResult(out / name).fold_dir(fold)
            held_out = d / "oof_predictions.parquet"
            val.append(pd.read_parquet(held_out if held_out.exists() else d / "val_predictions.parquet")
                       .set_index("path"))
            test.append(pd.read_parquet(d / "predictions.parquet").set_index("path"))
        val_paths = sorted(set.intersection(*(set(v.index) for v in val)))
        test_paths = list(test[0].index[test[0].index.isin(set.intersection(*(set(t.index) for t in test)))])
        y_val = label_ids(val[0].loc[val_paths, "true"], labels)
        y_test = label_ids(test[0].loc[test_paths, "true"], labels)
        temps, val_probs, test_probs = [], [], []
        for v, t in zip(val, test):
            # the members' log-probabilities act as their logits: a temperature rescales them
            logv = np.log(np.clip(v.loc[val_paths, prob_cols].to_numpy(np.float64), 1e-12, None))
            logt = np.log(np.clip(t.loc[test_paths, prob_cols].to_numpy(np.float64), 1e-12, None))
            temp = fit_temperature(logv, y_val)
            temps.append(temp)
            val_probs.append(softmax(logv / temp, axis=1))
            test_probs.append(softmax(logt / temp, axis=1))
        speakers = val[0].loc[val_paths, "speaker"].astype(str).to_numpy() if "speaker" in val[0] else None
        weights, weighting = choose_weights(val_probs, y_val, speakers)
        mix = np.tensordot(weights, np.stack(test_probs), axes=1)
        metrics = classification_metrics(y_test, mix.argmax(1), labels)
        uniform = classification_metrics(y_test, np.mean(test_probs, axis=0).argmax(1), labels)
        metrics.update(fold=fold, weights=dict(zip(names, map(float, weights))), weighting=weighting,
                       temperatures=dict(zip(names, temps)),
                       uniform_ua=uniform["ua"], uniform_wa=uniform["wa"], uniform_macro_f1=uniform["macro_f1"],
                       members={n: classification_metrics(y_test, p.argmax(1), labels)["ua"]
                                for n, p in zip(names, test_probs)},
                       n_val=len(val_paths), n_test=len(test_paths),
                       test_speakers=sorted(test[0].loc[test_paths, "speaker"].astype(str).unique())
                       if "speaker" in test[0] else [])
        per_fold.append(metrics)
        log.info("fold %d ensemble: test UA %.3f (members %s; weights %s)", fold, metrics["ua"],
                 ", ".join(f"{n} {u:.3f}" for n, u in metrics["members"].items()),
                 ", ".join(f"{n} {w:.2f}" for n, w in metrics["weights"].items()))
        if features is not None:
            to_self_train.append(dict(
                fold_dirs=[CvResult(out / n).fold_dir(fold) for n in names], temperatures=temps,
                weights=weights, x_train=[np.stack([features[n][p] for p in val_paths]) for n in names], y_train=y_val,
                train_speakers=speakers, oof_probs=np.tensordot(weights, np.stack(val_probs), axes=1),
                x_test=[np.stack([features[n][p] for p in test_paths]) for n in names],
                copies=_fold_copies(copies, names, val_paths, y_val, speakers),
                test_speakers=test[0].loc[test_paths, "speaker"].astype(str).to_numpy(), test_probs=mix, y_test=y_test))
    self_trained = None
    if features is not None:
        self_trained = _self_train_folds(to_self_train, labels)
        for metrics, (adapted, info) in zip(per_fold, self_trained):
            metrics.update(self_train=info, self_trained_ua=adapted["ua"], self_trained_wa=adapted["wa"],
                           self_trained_macro_f1=adapted["macro_f1"])
            log.info("fold %d ensemble self-trained on its test speakers (threshold %s, %d clips pseudo-labelled): "
                     "test UA %.3f -> %.3f", metrics["fold"], info["threshold"], info["pseudo_labelled"],
                     metrics["ua"], adapted["ua"])
    summary = {**summarize_folds(per_fold), "members": names, "labels": labels, "folds": folds,
               # equal weights over the calibrated members (nothing fitted but T): with few held-out
               # speakers, fitted weights can follow their noise
               "uniform_weights": summarize_folds(per_fold, keys=("uniform_ua",))["uniform_ua"],
               "uniform": _prefixed_scores(per_fold, "uniform"),
               "per_fold": [{k: m[k] for k in ("fold", "ua", "wa", "macro_f1", "uniform_ua", "members", "weights",
                                               "weighting", "temperatures", "n_val", "n_test", "test_speakers")}
                            | ({"self_train": m["self_train"], "self_trained_ua": m["self_trained_ua"]}
                               if self_trained else {}) for m in per_fold]}
    if self_trained:
        summary["self_trained"] = _prefixed_scores(per_fold, "self_trained")
    (ens_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("per-fold ensemble of %s over %d fold(s): UA %.3f ± %.3f", ", ".join(names), len(folds),
             summary["ua"]["mean"], summary["ua"]["std"])
    return summary


def _fold_copies(copies: dict | None, names: list[str], paths: list[str], y: np.ndarray, speakers: np.ndarray):
    """The training rows' copies that every member has, as ``(x per member, y, speakers)``; None without."""
    if not copies:
        return None
    pairs = [(speed, i) for speed, by_name in copies.items() for i, p in enumerate(paths)
             if all(p in by_name[n] for n in names)]
    if not pairs:
        return None
    index = np.array([i for _, i in pairs])
    x = [np.stack([copies[speed][n][paths[i]] for speed, i in pairs]) for n in names]
    return x, np.asarray(y)[index], np.asarray(speakers)[index]


def _self_train_folds(folds: list[dict], labels: list[str]) -> list[tuple[dict, dict]]:
    """Self-train each fold's ensemble (a Ray task per fold, 1 CPU each); per fold the self-trained
    test metrics and what :func:`ser_ray.train.self_train.self_train_fold` did."""
    import ray

    from ser_ray.models import load_model
    from ser_ray.train.metrics import classification_metrics
    from ser_ray.train.self_train import Copies, Member, encodings, self_train_fold

    @ray.remote(num_cpus=1)
    def one(members, weights, x_train, y_train, train_speakers, oof_probs, x_test, test_speakers, test_probs,
            copies):
        import torch

        torch.set_num_threads(1)
        if copies is not None:
            copies = Copies(encodings(members, copies[0]), copies[1], copies[2])
        return self_train_fold(members, weights, encodings(members, x_train), y_train, train_speakers, oof_probs,
                               encodings(members, x_test), test_speakers, test_probs, copies=copies)

    refs = []
    for f in folds:
        members = [Member(load_model(str(d / "model"))[0], t) for d, t in zip(f["fold_dirs"], f["temperatures"])]
        refs.append(one.remote(members, f["weights"], f["x_train"], f["y_train"], f["train_speakers"],
                               f["oof_probs"], f["x_test"], f["test_speakers"], f["test_probs"], f["copies"]))
    results = []
    for f, (probs, info) in zip(folds, ray.get(refs)):
        results.append((classification_metrics(f["y_test"], probs.argmax(1), labels), info))
    return results


def comparison_markdown(table: pd.DataFrame, config: TrainConfig) -> str:
    """The comparison table as Markdown, metrics as ``mean ± std`` over folds."""
    head = ["family", *(METRIC_NAMES[k] for k in METRICS), "parameters", "train s/epoch", "inference ms/clip", "folds"]
    lines = [
        (f"# Model comparison: {config.data.corpus_name}, protocol {config.data.protocol}, "
         f"label map {config.label_map}, up to {config.epochs} epochs"
         + (", speaker-normalised features (test speakers' unlabelled clips included)"
            if config.data.speaker_norm else "")),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for row in table.to_dict("records"):
        cells = [row["family"], *(f"{row[f'{k}_mean']:.3f} ± {row[f'{k}_std']:.3f}" for k in METRICS),
                 f"{int(row['params']):,}", "–" if np.isnan(row["train_s_per_epoch"]) else f"{row['train_s_per_epoch']:.2f}",
                 f"{row['infer_ms_per_clip']:.3f}", str(row["folds"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± population std over folds; inference timed on CPU over each fold's test clips."
              + (" The ensemble row: per fold, the members' temperatures and weights fitted on held-out "
                 "predictions of that fold's non-test speakers (all training speakers out of fold when every "
                 "member is classical, else the validation speakers; out/ensemble/summary.json), or equal "
                 "weights where those predict left-out speakers better (`weighting` per fold); its "
                 "inference time is the members' sum. The uniform row: the same calibrated members, "
                 "equal weights."
                 if "ensemble" in set(table["family"]) else "")
              + (" The self-training row: each fold's ensemble refitted per test speaker with that speaker's "
                 "clips it labels confidently (pseudo-labels; the threshold, or none, chosen on the training "
                 "speakers; `self_train` per fold in out/ensemble/summary.json). Test labels are never read, but "
                 "the test speakers' clips are: transductive, like speaker normalisation."
                 if "ensemble + self-training" in set(table["family"]) else ""), ""]
    return "\n".join(lines)


def plot_comparison(table: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Grouped bars: UA, WA and macro-F1 per family, std over folds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ser_ray.report.plots import save_figure

    x = np.arange(len(table))
    width = 0.8 / len(METRICS)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(table) + 2), 3.8))
    for j, key in enumerate(METRICS):
        ax.bar(x + (j - (len(METRICS) - 1) / 2) * width, table[f"{key}_mean"], width, yerr=table[f"{key}_std"],
               capsize=3, label=METRIC_NAMES[key])
    ax.set_xticks(x, table["family"], rotation=30 if len(table) > 4 else 0, ha="right" if len(table) > 4 else "center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.legend(ncol=len(METRICS), fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
