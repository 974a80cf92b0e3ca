"""What is in a manifest: class balance, durations, speakers, as CSV tables and PNG plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ser_ray.report.plots import save_figure  # noqa: E402


def describe_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tables behind ``describe``: name -> DataFrame."""
    by_emotion = df.groupby("emotion")
    class_balance = pd.DataFrame(
        {
            "clips": by_emotion.size(),
            "share": (by_emotion.size() / len(df)).round(4),
            "speakers": by_emotion["speaker"].nunique(),
        }
    )
    durations = lambda g: g["duration_s"].describe()[["mean", "std", "min", "50%", "max"]].round(3)  # noqa: E731
    by_speaker = df.groupby("speaker")
    speaker_table = by_speaker["duration_s"].describe()[["count", "mean", "min", "max"]].round(3)
    speaker_table.insert(0, "gender", by_speaker["gender"].first())
    speaker_table["total_s"] = by_speaker["duration_s"].sum().round(1)
    speaker_table["count"] = speaker_table["count"].astype(int)
    gender = df.groupby("gender").agg(speakers=("speaker", "nunique"), clips=("path", "size"))
    return {
        "class_balance": class_balance,
        "durations_by_emotion": by_emotion.apply(durations, include_groups=False),
        "durations_by_speaker": speaker_table,
        "speakers_by_gender": gender,
    }


def _save(fig, path: Path) -> str:
    return str(save_figure(fig, path, dpi=100))


def describe(df: pd.DataFrame, out_dir: str | Path) -> dict[str, str]:
    """Write the tables (CSV) and plots (PNG) to ``out_dir``; returns name -> path for each file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = describe_tables(df)
    paths = {}
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv")
        paths[f"{name}.csv"] = str(out / f"{name}.csv")

    emotions = sorted(df["emotion"].unique())
    fig, ax = plt.subplots(figsize=(7, 4))
    tables["class_balance"]["clips"].plot.bar(ax=ax, color="tab:blue")
    ax.set(title="Clips per emotion", xlabel="", ylabel="clips")
    paths["class_balance.png"] = _save(fig, out / "class_balance.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([df.loc[df["emotion"] == e, "duration_s"] for e in emotions], tick_labels=emotions)
    ax.set(title="Clip duration per emotion", ylabel="seconds")
    ax.tick_params(axis="x", rotation=45)
    paths["durations_by_emotion.png"] = _save(fig, out / "durations_by_emotion.png")

    speakers = sorted(df["speaker"].unique())
    fig, ax = plt.subplots(figsize=(max(7, 0.3 * len(speakers)), 4))
    ax.boxplot([df.loc[df["speaker"] == s, "duration_s"] for s in speakers], tick_labels=speakers)
    ax.set(title="Clip duration per speaker", ylabel="seconds")
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    paths["durations_by_speaker.png"] = _save(fig, out / "durations_by_speaker.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    tables["speakers_by_gender"]["speakers"].plot.bar(ax=ax, color="tab:green")
    ax.set(title="Speakers per gender", xlabel="", ylabel="speakers")
    paths["speakers_by_gender.png"] = _save(fig, out / "speakers_by_gender.png")
    return paths
