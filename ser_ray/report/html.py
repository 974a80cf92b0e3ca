"""A self-contained HTML report of a result directory (images embedded as base64).

The report reads what the stages left behind — it never recomputes anything — so the same command
renders the demo's directory or any directory a user assembled by running the stages one by one.
Sections whose artefacts are missing say so instead of failing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import time
from pathlib import Path

import pandas as pd

import ser_ray

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
.missing{color:#999;font-style:italic}.leaky{color:#b00;font-weight:bold}
.figs{display:flex;flex-wrap:wrap;gap:1em}.figs figure{margin:0;flex:1 1 45%}
code{background:#f5f5f5;padding:1px 4px}
.scroll{overflow-x:auto;max-width:100%}
.headline{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:0.6em 1.2em}
.headline .big{font-size:1.6em;font-weight:600}
"""

# (section id, title, description)
SECTIONS = [
    ("headline", "Headline", "What this run produced, in one place; the sections below hold the details."),
    ("corpus", "Corpus", "What was trained on: clips per emotion, durations, speakers."),
    ("splits", "Split protocol", "Speaker-disjoint splits: no speaker is on both sides."),
    ("search", "Hyperparameter search", "Every trial of the Optuna (TPE) + ASHA search."),
    ("models", "Models and ensemble", "Best model per family and the ensemble, on held-out speakers."),
    ("evaluation", "Cross-validation, cross-corpus and comparisons",
     "Every <code>ser-ray cv</code> / <code>compare</code> / cross-corpus result found here: mean ± std over folds."),
    ("annotation", "Archive annotation", "Long recordings labelled window by window."),
    ("throughput", "Throughput", "Speeds measured during this run."),
]


def _img(path: Path, caption: str | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    cap = html.escape(caption or path.stem.replace("_", " "))
    return (f'<figure><img alt="{cap}" src="data:image/png;base64,{data}">'
            f"<figcaption>{cap}</figcaption></figure>")


def _figs(paths) -> str:
    paths = [p for p in paths if p.exists()]
    return '<div class="figs">' + "".join(_img(p) for p in paths) + "</div>" if paths else ""


def number(x) -> str:
    """A number as people read it: 1,234 · 0.987 · 1.000 · 12.35 · 1.3e-04; missing values as a dash."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (bool, str)) or not isinstance(x, numbers.Number):
        return str(x)
    if isinstance(x, numbers.Integral) or (float(x).is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    x = float(x)
    magnitude = abs(x)
    if magnitude == 0:
        return "0"
    if magnitude < 1e-3 or magnitude >= 1e6:
        return f"{x:.2g}" if magnitude >= 1e6 else f"{x:.1e}"
    if magnitude < 10:  # scores, probabilities, seconds: three decimals, so 1.000 lines up with 0.994
        return f"{x:.3f}"
    return f"{x:,.1f}" if magnitude >= 100 else f"{x:.2f}"


def _table(df: pd.DataFrame, max_rows: int = 40) -> str:
    """An HTML table inside a horizontal scroller (wide tables stay inside the page)."""
    more = len(df) - max_rows
    if more > 0:
        df = df.head(max_rows)
    cells = df.astype(object).map(lambda v: number(v) if isinstance(v, numbers.Number) or v is None else v)
    note = f'<p class="missing">… {more} more rows in the CSV.</p>' if more > 0 else ""
    return '<div class="scroll">' + cells.to_html(index=False, border=0, escape=True, na_rep="–") + "</div>" + note


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _missing(what: str) -> str:
    return f'<p class="missing">Not in this directory: {html.escape(what)}.</p>'


def _find(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def _metrics_row(name: str, metrics: dict) -> dict:
    row = {"model": name}
    for key in ("ua", "wa", "macro_f1", "ece"):
        if key in metrics:
            row[key.upper() if key != "macro_f1" else "macro-F1"] = metrics[key]
    return row


def section_corpus(root: Path) -> str:
    parts = []
    summary = _json(root / "eda" / "summary.json")
    if summary:
        parts.append(_table(pd.DataFrame([{k: v for k, v in summary.items() if not isinstance(v, (dict, list))}])))
    for csv in _find(root, "eda/*.csv")[:3]:
        parts.append(f"<h3>{html.escape(csv.stem.replace('_', ' '))}</h3>" + _table(pd.read_csv(csv)))
    parts.append(_figs(_find(root, "eda/*.png")))
    return "".join(parts) if any(parts) else _missing("eda/ (run `ser-ray describe`)")


def _search_split(root: Path) -> dict | None:
    """The speakers on each side of a search's split (``<experiment>/split.parquet``), as folds.json has them."""
    found = _find(root, "**/split.parquet")
    if not found:
        return None
    split = pd.read_parquet(found[0], columns=["speaker", "split"])
    search = _json(found[0].parent / "best.json") or {}
    protocol = (search.get("_search") or {}).get("split") or {}
    return {"protocol": f"{protocol.get('protocol', '?')} (the search's split; validation speakers inside training)",
            "leaky": bool(protocol.get("leaky")),
            "speakers": {side: sorted(split.loc[split["split"] == side, "speaker"].unique().tolist())
                         for side in ("train", "val", "test")}}


def section_splits(root: Path) -> str:
    folds = _json(root / "splits" / "folds.json") or _json(root / "folds.json") or _search_split(root)
    if not folds:
        return _missing("splits/folds.json or a search's split.parquet")
    parts = []
    if folds.get("leaky"):
        parts.append('<p class="leaky">LEAKY split: clips of one speaker on both sides.</p>')
    protocol = folds.get("protocol", "?")
    parts.append(f"<p>Protocol: <code>{html.escape(str(protocol))}</code></p>")
    groups = folds.get("speakers") or folds.get("splits") or {}  # ser_ray.splits.fold_lists layout
    rows = [{"split": k, "speakers": len(v), "list": ", ".join(map(str, v))} for k, v in groups.items()]
    if rows:
        parts.append(_table(pd.DataFrame(rows)))
    return "".join(parts)


def section_headline(root: Path) -> str:
    """Ensemble test scores and what they were measured on, the search's best trials, the archive."""
    items = []
    ens = _find(root, "**/ensemble_metrics.json")
    if ens:
        data = _json(ens[0]) or {}
        test = (data.get("test") or {}).get("ensemble")
        if isinstance(test, dict):
            bundle = _json(ens[0].parent / "bundle.json") or {}
            summary = bundle.get("data_summary") or {}
            shown = {"corpus": "corpus", "corpora": "corpora", "split": "split", "n_val": "validation clips",
                     "n_test": "test clips"}
            on = ", ".join(f"{shown[k]} {', '.join(map(str, v)) if isinstance(v, list) else v}"
                           for k, v in summary.items() if k in shown)
            items.append(f'<p class="big">Ensemble on held-out test speakers: UA {number(test.get("ua"))} · '
                         f'WA {number(test.get("wa"))} · macro-F1 {number(test.get("macro_f1"))}</p>'
                         + (f"<p>{html.escape(on)}; weights fitted on the validation speakers.</p>" if on else ""))
    best = _find(root, "**/best.json")
    if best:
        lines = [f"{html.escape(family)}: val UA {number(info['val'].get('ua'))}"
                 + (f", test UA {number(info['test'].get('ua'))}" if isinstance(info.get("test"), dict) else "")
                 for family, info in (_json(best[0]) or {}).items()
                 if not family.startswith("_") and isinstance(info, dict) and isinstance(info.get("val"), dict)]
        if lines:
            items.append("<p>Best trial per family: " + " · ".join(lines) + "</p>")
    ann = _find(root, "**/annotation_summary.json")
    if ann:
        data = _json(ann[0]) or {}
        shown = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if shown:
            items.append("<p>Archive: " + " · ".join(f"{html.escape(k.replace('_', ' '))} {number(v)}"
                                                     for k, v in list(shown.items())[:6]) + "</p>")
    return '<div class="headline">' + "".join(items) + "</div>" if items else _missing("results to summarise")


def section_search(root: Path) -> str:
    trials = _find(root, "**/trials.csv")
    if not trials:
        return _missing("trials.csv (run `ser-ray tune`)")
    df = pd.read_csv(trials[0])
    # what was searched (param/*) and how it went; the JSON config and paths stay in the CSV
    first = [c for c in ("trial_id", "family", "best_val_ua", "best_val_wa", "best_val_macro_f1", "epochs_run",
                         "stop_reason", "is_default") if c in df.columns]
    keep = first + [c for c in df.columns if c.startswith("param/")]
    if "best_val_ua" in df:
        df = df.sort_values("best_val_ua", ascending=False)
    parts = [f"<p>{len(df)} trials from <code>{html.escape(str(trials[0].relative_to(root)))}</code>, best first "
             "(every column in the CSV).</p>", _table(df[keep].rename(columns=lambda c: c.removeprefix("param/")))]
    parts.append(_figs(_find(trials[0].parent, "*.png")))
    return "".join(parts)


def section_models(root: Path) -> str:
    parts = []
    rows = []
    best = _find(root, "**/best.json")
    if best:
        for family, info in (_json(best[0]) or {}).items():
            for split in ("val", "test"):
                if isinstance(info, dict) and isinstance(info.get(split), dict):
                    rows.append({**_metrics_row(family, info[split]), "split": split})
    ens = _find(root, "**/ensemble_metrics.json")
    if ens:
        data = _json(ens[0]) or {}
        val = data.get("validation") or {}
        if isinstance(val.get("ensemble"), dict):
            rows.append({**_metrics_row("ensemble", val["ensemble"]), "split": "val"})
        test = data.get("test") or {}
        for name, m in (test.get("members") or {}).items():
            rows.append({**_metrics_row(f"member {name}", m), "split": "test"})
        if isinstance(test.get("ensemble"), dict):
            rows.append({**_metrics_row("ensemble", test["ensemble"]), "split": "test"})
        if val.get("weights"):
            weights = ", ".join(f"{k}: {v:.2f}" for k, v in val["weights"].items())
            parts.append(f"<p>Ensemble weights (fitted on validation): {html.escape(weights)}</p>")
    if rows:
        df = pd.DataFrame(rows).drop_duplicates()
        parts.insert(0, _table(df[["model", "split", *[c for c in df.columns if c not in ("model", "split")]]]))
    parts.append(_figs([p for p in _find(root, "**/*.png") if "confusion" in p.name]))
    parts.append(_figs([p for p in _find(root, "**/*.png") if "learning" in p.name][:4]))
    return "".join(parts) if any(parts) else _missing("best.json / ensemble_metrics.json")


def section_evaluation(root: Path) -> str:
    """cv and cross-corpus summaries (``summary.json`` with fold metrics) and ``compare`` tables."""
    parts = []
    for table in _find(root, "**/comparison.csv"):
        where = html.escape(str(table.parent.relative_to(root)))
        df = pd.read_csv(table)
        keep = [c for c in ("family", "ua_mean", "ua_std", "wa_mean", "wa_std", "macro_f1_mean", "macro_f1_std",
                            "params", "train_s_per_epoch", "infer_ms_per_clip", "folds") if c in df.columns]
        parts.append(f"<h3>Comparison <code>{where}</code></h3>" + _table(df[keep]))
        parts.append(_figs([table.with_suffix(".png")] if table.with_suffix(".png").exists() else []))
    rows = []
    for path in _find(root, "**/summary.json"):
        data = _json(path) or {}
        if not isinstance(data.get("ua"), dict) or "protocol" not in data:
            continue  # not a cv / cross-corpus summary
        corpus = (f"{data['train_corpus']} -> {data['test_corpus']}" if data.get("test_corpus")
                  else data.get("corpus", "?"))
        row = {"result": str(path.parent.relative_to(root)), "family": data.get("family"), "corpus": corpus,
               "protocol": data["protocol"] + (" (LEAKY)" if data.get("leaky") else "")
               + (" + speaker norm" if data.get("speaker_norm") else ""),
               "folds": len(data.get("folds_run") or [])}
        for key, name in (("ua", "UA"), ("wa", "WA"), ("macro_f1", "macro-F1")):
            if isinstance(data.get(key), dict):
                row[name] = f"{data[key]['mean']:.3f} ± {data[key]['std']:.3f}"
        if data.get("dropped_labels"):
            dropped = data["dropped_labels"]
            row["labels dropped"] = ", ".join(dropped.get("train_only", []) + dropped.get("test_only", [])) or "-"
        rows.append(row)
    if rows:
        parts.append("<h3>Runs</h3>" + _table(pd.DataFrame(rows)))
    return "".join(parts) if any(parts) else _missing("cv / compare results (run `ser-ray cv` or `ser-ray compare`)")


def section_annotation(root: Path) -> str:
    parts = []
    summary = _find(root, "**/annotation_summary.json")
    if summary:
        data = _json(summary[0]) or {}
        parts.append(_table(pd.DataFrame([{k: v for k, v in data.items() if not isinstance(v, (dict, list))}])))
    for page in _find(root, "**/archive.html"):  # written by `ser-ray report --annotations` and the demo
        rel = page.relative_to(root).as_posix()
        parts.append(f'<p>Every file, its timeline and its windows, filterable and playable: '
                     f'<a href="{html.escape(rel)}">{html.escape(rel)}</a></p>')
    parts.append(_figs([p for p in _find(root, "**/*.png") if "timeline" in p.name or "label_distribution" in p.name]))
    return "".join(parts) if any(parts) else _missing("annotation outputs (run `ser-ray annotate`)")


def section_throughput(root: Path) -> str:
    data = _json(root / "throughput.json")
    if not data:
        return _missing("throughput.json")
    return _table(pd.DataFrame([{"measure": k, "value": v} for k, v in data.items()]))


def render_report(result_dir: str | Path, out: str | Path | None = None, title: str = "ser-ray report") -> Path:
    """Write ``report.html`` for ``result_dir`` and return its path."""
    root = Path(result_dir)
    out = Path(out) if out else root / "report.html"
    builders = {
        "headline": section_headline,
        "corpus": section_corpus,
        "splits": section_splits,
        "search": section_search,
        "models": section_models,
        "evaluation": section_evaluation,
        "annotation": section_annotation,
        "throughput": section_throughput,
    }
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>ser-ray {ser_ray.__version__} · {time.strftime('%Y-%m-%d %H:%M')} · "
            f"<code>{html.escape(str(root))}</code></p>"]
    for sid, heading, text in SECTIONS:
        body.append(f'<section id="{sid}"><h2>{heading}</h2><p>{text}</p>{builders[sid](root)}</section>')
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                   f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    return out
