"""Search plots: validation UA of every trial over time, and Optuna parameter importances per family."""

from __future__ import annotations

import io
import json
import logging
import math

import pandas as pd

from ser_ray import storage
from ser_ray.tune import space as spaces

log = logging.getLogger(__name__)

MIN_TRIALS_FOR_IMPORTANCE = 4  # fANOVA on fewer completed trials says nothing


def _save(fig, uri: str) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def plot_search_curves(table: pd.DataFrame, uri: str, metric: str = "val_ua") -> None:
    """Each trial's per-epoch ``metric`` against minutes since the search started, coloured by family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows = table[table.get("history").notna()] if "history" in table else table[:0]
    t0 = min((json.loads(h)[0]["timestamp"] for h in rows["history"] if json.loads(h)), default=0)
    colors = {}
    for _, row in rows.iterrows():
        points = json.loads(row["history"])
        if not points:
            continue
        color = colors.setdefault(row["family"], f"C{len(colors)}")
        minutes = [(p["timestamp"] - t0) / 60 for p in points]
        ax.plot(minutes, [p[metric] for p in points], "-o", ms=3, lw=1, color=color, alpha=0.8,
                label=row["family"] if row["family"] not in ax.get_legend_handles_labels()[1] else None)
        if row.get("stop_reason") == "asha":
            ax.plot(minutes[-1], points[-1][metric], "x", color=color, ms=7)
    ax.set_xlabel("minutes since the first report")
    ax.set_ylabel(f"{metric} (validation)")
    ax.set_title(f"search: {len(rows)} trial(s); x = stopped by ASHA")
    ax.grid(alpha=0.3)
    if colors:
        ax.legend()
    _save(fig, uri)


def study_from_table(table: pd.DataFrame, family: str, family_space: dict):
    """An Optuna study holding ``family``'s completed trials (params from the table, value = best val UA)."""
    import optuna

    distributions = {k: spaces.optuna_distribution(v) for k, v in spaces.flatten(family_space).items()
                     if isinstance(v, spaces.Domain)}
    study = optuna.create_study(direction="maximize")
    rows = table[(table["family"] == family) & table["best_val_ua"].notna()]
    for _, row in rows.iterrows():
        params = {}
        for name in distributions:
            value = row.get(f"param/{name}")
            if value is None or (isinstance(value, float) and math.isnan(value)):
                break
            params[name] = value.item() if hasattr(value, "item") else value
        else:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                      value=float(row["best_val_ua"])))
    return study


def plot_param_importances(table: pd.DataFrame, families_spaces: dict[str, dict], uri: str) -> list[str]:
    """fANOVA importances of each family's parameters (one panel per family with enough trials).

    Returns notes on the families skipped; writes nothing when no family has enough trials.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    notes, panels = [], []
    for family, fam_space in families_spaces.items():
        study = study_from_table(table, family, fam_space)
        n = len(study.trials)
        if n < MIN_TRIALS_FOR_IMPORTANCE:
            notes.append(f"{family}: {n} completed trial(s), need {MIN_TRIALS_FOR_IMPORTANCE} for importances")
            continue
        try:
            importances = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (RuntimeError, ValueError) as exc:  # e.g. every trial with the same value
            notes.append(f"{family}: importances not computable ({exc})")
            continue
        panels.append((family, n, importances))
    if not panels:
        if notes:
            log.info("param_importances.png skipped: %s", "; ".join(notes))
        return notes
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (family, n, importances) in zip(axes[0], panels):
        names = list(importances)[::-1]
        ax.barh(names, [importances[k] for k in names], color="C0")
        ax.set_title(f"{family} ({n} trials)")
        ax.set_xlabel("fANOVA importance for best val UA")
    _save(fig, uri)
    return notes


def write_plots(table: pd.DataFrame, cfg) -> list[str]:
    """``search_curves.png`` and ``param_importances.png`` in the experiment directory; returns notes."""
    notes: list[str] = []
    if len(table) == 0:
        return ["no trials: no plots"]
    plot_search_curves(table, storage.join(cfg.experiment_path, "search_curves.png"), cfg.metric)
    families_spaces = {f: spaces.family_space(f, cfg.space.get(f)) for f in cfg.families}
    notes += plot_param_importances(table, families_spaces, storage.join(cfg.experiment_path, "param_importances.png"))
    for note in notes:
        log.info("plots: %s", note)
    return notes
