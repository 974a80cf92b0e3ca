"""The archive page: what ``ser-ray annotate`` found in every file, to look at and listen to.

One self-contained HTML file (no network, no external scripts) read from the annotation tables:
for each file its status and dominant label, an emotion timeline (one bar per window, coloured by
label, opaque by confidence) and its windows in a table. Filters by label and minimum confidence act
on the timelines and the tables at once; clicking a bar or a row's play button plays that window of
the recording in the page's audio player (local files only: an ``s3://`` recording is not reachable
from a page opened from disk, so its windows have no play button).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

from ser_ray import storage
from ser_ray.report.html import number

# matplotlib's tab10, so the page and the PNG timelines colour labels alike
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}
.bar{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:0.5em 0;z-index:1;
display:flex;flex-wrap:wrap;gap:1em;align-items:center}
.file{border:1px solid #ddd;border-radius:6px;padding:0.4em 0.8em;margin:0.8em 0}
.file h3{margin:0.2em 0;font-size:1em;word-break:break-all}
.err{color:#b00}.muted{color:#777}
svg.timeline{width:100%;height:34px;background:#f6f6f6;cursor:pointer}
svg.timeline rect.off{opacity:0.08 !important}
table{border-collapse:collapse;font-size:0.85em;margin:0.4em 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}th{background:#f3f3f3}
td:nth-child(3),th:nth-child(3){text-align:left}
.legend span{display:inline-block;padding:0 6px;margin-right:4px;border-radius:3px;color:#fff;font-size:0.85em}
details summary{cursor:pointer;color:#555}
"""

SCRIPT = """
const player = document.getElementById('player');
let stopAt = null;
player.addEventListener('timeupdate', () => {
  if (stopAt !== null && player.currentTime >= stopAt) { player.pause(); stopAt = null; }
});
function playWindow(el) {
  const src = el.dataset.src; if (!src) return;
  const start = parseFloat(el.dataset.start), end = parseFloat(el.dataset.end);
  // a media fragment, so the browser seeks before playing even if the file is not loaded yet
  const url = src + '#t=' + start + ',' + end;
  if (player.getAttribute('src') !== url) player.setAttribute('src', url);
  player.dataset.playing = el.dataset.uri + ' ' + start + '-' + end;
  document.getElementById('now').textContent = el.dataset.name + '  ' + start.toFixed(1) + '–' + end.toFixed(1) + ' s';
  stopAt = end;
  const go = () => { player.currentTime = start; player.play().catch(() => {}); };
  if (player.readyState >= 1) go(); else player.addEventListener('loadedmetadata', go, {once: true});
}
function applyFilters() {
  const label = document.getElementById('label').value;
  const minConf = parseFloat(document.getElementById('conf').value);
  document.getElementById('confval').textContent = minConf.toFixed(2);
  let shown = 0;
  document.querySelectorAll('[data-conf]').forEach(el => {
    const ok = (label === '' || el.dataset.label === label) && parseFloat(el.dataset.conf) >= minConf;
    if (el.tagName === 'rect') el.classList.toggle('off', !ok);
    else if (el.tagName === 'TR') { el.hidden = !ok; if (ok) shown++; }
  });
  document.querySelectorAll('.file').forEach(f => {
    const rows = f.querySelectorAll('tr[data-conf]');
    const visible = Array.from(rows).filter(r => !r.hidden).length;
    const n = f.querySelector('.nmatch'); if (n) n.textContent = visible + ' of ' + rows.length + ' windows match';
  });
  document.getElementById('shown').textContent = shown;
}
document.querySelectorAll('[data-src]').forEach(el => el.addEventListener('click', () => playWindow(el)));
document.getElementById('label').addEventListener('change', applyFilters);
document.getElementById('conf').addEventListener('input', applyFilters);
applyFilters();
"""


def audio_link(uri: str, page_dir: Path) -> str | None:
    """How the page reaches a recording: a path relative to the page (the two can move together),
    or None where a page opened from disk cannot reach it (``s3://``)."""
    if storage.is_s3(uri):
        return None
    path = Path(uri).resolve()
    try:
        rel = os.path.relpath(path, page_dir.resolve())
    except ValueError:  # another drive (Windows)
        return path.as_uri()
    return "/".join(rel.split(os.sep))


def _timeline_svg(segs: pd.DataFrame, duration: float, colors: dict, attrs) -> str:
    rects = []
    # windows overlap when the hop is shorter than the window: each bar runs to the next window's
    # start, so bars tile the time axis and every one of them can be clicked
    ends = list(segs["start_s"].iloc[1:]) + [float("inf")]
    for row, next_start in zip(segs.itertuples(index=False), ends):
        x = 100.0 * row.start_s / duration
        w = max(100.0 * (min(row.end_s, next_start) - row.start_s) / duration, 0.15)
        color = colors.get(row.label, "#999")
        conf = float(row.confidence)
        rects.append(f'<rect x="{x:.3f}%" y="2" width="{w:.3f}%" height="30" fill="{color}" '
                     f'style="opacity:{0.25 + 0.75 * conf:.2f}" {attrs(row)}>'
                     f"<title>{row.start_s:.1f}–{row.end_s:.1f} s {html.escape(str(row.label))} "
                     f"{conf:.2f}</title></rect>")
    return f'<svg class="timeline" preserveAspectRatio="none">{"".join(rects)}</svg>'


def render_archive(files: pd.DataFrame, segments: pd.DataFrame, out: str | Path, title: str,
                   max_files: int = 300, max_rows_per_file: int = 2000) -> Path:
    """Write the archive page of one annotation output's tables (``files``: one row per input file;
    ``segments``: one row per window, as ``ResultWriter.read_tables`` returns them) to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = sorted(c[len("prob_"):] for c in segments.columns if c.startswith("prob_"))
    labels += sorted(set(segments.get("label", pd.Series(dtype=str)).dropna()) - set(labels))
    colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    by_uri = dict(tuple(segments.groupby("uri", sort=False))) if len(segments) else {}

    status = files["status"].value_counts()
    summary = {"files": len(files), "labelled": int(status.get("ok", 0)), "with an error": int(status.get("error", 0)),
               "to retry": int(status.get("retry", 0)), "windows": len(segments)}
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p>" + " · ".join(f"{number(v)} {k}" for k, v in summary.items()) + "</p>",
             '<p class="legend">' + "".join(f'<span style="background:{c}">{html.escape(lb)}</span>'
                                            for lb, c in colors.items()) + "</p>"]
    options = "".join(f'<option value="{html.escape(lb)}">{html.escape(lb)}</option>' for lb in labels)
    parts.append(
        '<div class="bar"><label>label <select id="label"><option value="">all</option>' + options
        + '</select></label><label>confidence ≥ <input id="conf" type="range" min="0" max="1" step="0.05" '
        'value="0"> <span id="confval">0.00</span></label><span><span id="shown">0</span> windows shown</span>'
        '<audio id="player" controls preload="metadata"></audio><span id="now" class="muted"></span></div>')
    shown_files = files.head(max_files)
    if len(files) > max_files:
        parts.append(f'<p class="muted">The first {max_files} of {len(files)} files (by uri); '
                     "pass --page-max-files for more.</p>")
    for f in shown_files.itertuples(index=False):
        uri = str(f.uri)
        name = uri.rsplit("/", 1)[-1]
        segs = by_uri.get(uri, pd.DataFrame(columns=["start_s", "end_s", "label", "confidence"]))
        # a window without a confidence reads as 0 everywhere on the page (bar, filters, table)
        segs = segs.sort_values("start_s").assign(confidence=lambda d: d["confidence"].astype(float).fillna(0.0))
        src = audio_link(uri, out.parent)
        head = f"<h3>{html.escape(name)}</h3><div class='muted'>{html.escape(uri)}</div>"
        if f.status != "ok":
            error = getattr(f, "error", "") or ""
            parts.append(f'<div class="file">{head}<p class="err">{html.escape(str(f.status))}: '
                         f"{html.escape(str(error))}</p></div>")
            continue
        dominant = getattr(f, "label", None)
        if not len(segs):
            parts.append(f'<div class="file">{head}<p class="muted">no speech found</p></div>')
            continue
        duration = max(float(segs["end_s"].max()), 1e-3)

        def attrs(row, uri=uri, name=name, src=src):
            conf = float(row.confidence)
            a = (f'data-uri="{html.escape(uri)}" data-name="{html.escape(name)}" data-start="{row.start_s:.3f}" '
                 f'data-end="{row.end_s:.3f}" data-label="{html.escape(str(row.label))}" data-conf="{conf:.4f}"')
            return a + (f' data-src="{html.escape(src)}"' if src else "")

        rows = []
        for row in segs.head(max_rows_per_file).itertuples(index=False):
            play = f'<button {attrs(row)} title="play this window">▶</button>' if src else ""
            conf = float(row.confidence)
            rows.append(f'<tr data-label="{html.escape(str(row.label))}" data-conf="{conf:.4f}"><td>{row.start_s:.1f}</td>'
                        f"<td>{row.end_s:.1f}</td><td>{html.escape(str(row.label))}</td><td>{conf:.3f}</td>"
                        f"<td>{play}</td></tr>")
        more = (f'<p class="muted">… {len(segs) - max_rows_per_file} more windows in the tables.</p>'
                if len(segs) > max_rows_per_file else "")
        playable = "" if src else '<span class="muted"> · not playable from this page (s3://)</span>'
        parts.append(
            f'<div class="file" data-file="{html.escape(uri)}">{head}'
            f"<p>dominant label <b>{html.escape(str(dominant))}</b> · {len(segs)} windows · "
            f'{duration:.1f} s{playable} · <span class="nmatch"></span></p>'
            + _timeline_svg(segs.head(max_rows_per_file), duration, colors, attrs)
            + "<details><summary>windows</summary><table><tr><th>start s</th><th>end s</th><th>label</th>"
            "<th>confidence</th><th></th></tr>" + "".join(rows) + "</table>" + more + "</details></div>")
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style>"
                   f"</head><body>{''.join(parts)}<script>{SCRIPT}</script></body></html>")
    return out
