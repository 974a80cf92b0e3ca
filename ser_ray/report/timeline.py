"""Annotation plots: per-file emotion probabilities over time, and the label distribution of an archive."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ser_ray.report.plots import save_figure  # noqa: E402


def _prob_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("prob_")]


def plot_timeline(segments_df: pd.DataFrame, uri: str, path: str, truth: pd.DataFrame | None = None) -> str:
    """Emotion probabilities of each window of ``uri`` against time (window centres); with
    ``truth`` (timeline rows: file, start_s, end_s, emotion) a ground-truth band underneath."""
    segs = segments_df[segments_df["uri"] == uri].sort_values("start_s")
    if segs.empty:
        raise ValueError(f"no segments for {uri}")
    cols = _prob_columns(segs)
    labels = [c[len("prob_"):] for c in cols]
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    rows = 2 if truth is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(12, 4 + rows), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [4, 1][:rows]})
    ax = axes[0, 0]
    centre = (segs["start_s"] + segs["end_s"]) / 2
    for col, label in zip(cols, labels):
        ax.plot(centre, segs[col], label=label, color=colors[label], lw=1.5)
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.set_title(os.path.basename(uri))
    ax.legend(loc="upper right", ncol=min(len(labels), 6), fontsize=8)
    if truth is not None:
        key = "file" if "file" in truth else "uri"
        spans = truth[truth[key].map(lambda u: os.path.basename(str(u))) == os.path.basename(uri)]
        band = axes[1, 0]
        for _, s in spans.iterrows():
            color = colors.get(s["emotion"], (0.85, 0.85, 0.85, 1.0))
            band.axvspan(s["start_s"], s["end_s"], color=color, alpha=0.8)
            if s["emotion"] in colors and s["end_s"] - s["start_s"] > 2:
                band.text((s["start_s"] + s["end_s"]) / 2, 0.5, s["emotion"], ha="center", va="center", fontsize=7)
        band.set_yticks([])
        band.set_ylabel("truth")
    axes[-1, 0].set_xlabel("time (s)")
    save_figure(fig, path, dpi=100)
    return path


def plot_label_distribution(files_df: pd.DataFrame, path: str) -> str:
    """Bar chart of dominant labels over annotated files, with errors and no-speech files counted."""
    ok = files_df[files_df["status"] == "ok"]
    counts = ok["label"].fillna("(no speech)").value_counts().sort_index()
    n_err = int((files_df["status"] == "error").sum())
    if n_err:
        counts["(error)"] = n_err
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(counts) + 2), 4))
    ax.bar(counts.index.astype(str), counts.values, color="tab:blue")
    ax.set_ylabel("files")
    ax.set_title(f"dominant emotion over {len(files_df)} files")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    save_figure(fig, path, dpi=100)
    return path
