"""The HTML report: every section is there, images are embedded, missing artefacts are said so.

The result directory is built from the real stage functions on a tiny corpus (describe, splits, plots,
the annotation writer); the search and ensemble files are written in the layout those stages write.
"""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ser_ray import cli
from ser_ray.corpora import build_manifest
from ser_ray.corpora.synthetic import generate
from ser_ray.report.eda import describe
from ser_ray.report.html import SECTIONS, render_report
from ser_ray.report.plots import plot_confusion, plot_learning_curves
from ser_ray.report.timeline import plot_label_distribution, plot_timeline
from ser_ray.splits import fixed_speaker_split, fold_lists
from ser_ray.train.compare import plot_comparison

LABELS = ["anger", "happiness", "sadness"]


class ReportParser(HTMLParser):
    """Collects section ids, the images inside each, and 'missing' notes."""

    def __init__(self):
        super().__init__()
        self.section = None
        self.images: dict[str, list[str]] = {}
        self.missing: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs["id"]
            self.images[self.section] = []
        elif tag == "img" and self.section:
            self.images[self.section].append(attrs["src"])
        elif tag == "p" and attrs.get("class") == "missing" and self.section:
            self.missing.add(self.section)


def parse(path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text())
    return parser


@pytest.fixture(scope="module")
def result_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("result")
    corpus = out / "corpus"
    generate(corpus, actors=4, seed=1, sentences=["DFA"], emotions=LABELS, workers=1, progress=False)
    manifest, _ = build_manifest("synthetic", str(corpus))
    describe(manifest, out / "eda")
    split = fixed_speaker_split(manifest, val_frac=0.25, test_frac=0.25, seed=0)
    (out / "splits").mkdir()
    (out / "splits" / "folds.json").write_text(json.dumps(fold_lists(split, "fixed", 0)))

    search = out / "search"
    search.mkdir()
    pd.DataFrame({"trial_id": ["a", "b"], "family": ["cnn", "bigru_attn"], "best_val_ua": [0.8, 0.7],
                  "stop_reason": ["completed", "asha"]}).to_csv(search / "trials.csv", index=False)
    metrics = {"ua": 0.8, "wa": 0.81, "macro_f1": 0.79}
    (search / "best.json").write_text(json.dumps({"cnn": {"val": metrics, "test": metrics}}))
    history = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "val_ua": 0.5 + e / 10}
               for e in range(3)]
    plot_learning_curves(history, search / "learning_curves.png")

    bundle = out / "bundle"
    bundle.mkdir()
    (bundle / "ensemble_metrics.json").write_text(json.dumps({
        "validation": {"weights": {"cnn": 1.0}, "ensemble": metrics},
        "test": {"members": {"cnn": metrics}, "ensemble": {**metrics, "ece": 0.05}},
    }))
    plot_confusion(np.eye(3) * 5 + 1, LABELS, bundle / "ensemble_test_confusion.png")

    compare = out / "compare"
    compare.mkdir()
    table = pd.DataFrame([{"family": f, "ua_mean": ua, "ua_std": 0.1, "wa_mean": ua, "wa_std": 0.1,
                           "macro_f1_mean": ua, "macro_f1_std": 0.1, "params": 1000, "train_s_per_epoch": 1.0,
                           "infer_ms_per_clip": 0.5, "folds": 2} for f, ua in (("cnn", 0.61), ("rezonet", 0.52))])
    table.to_csv(compare / "comparison.csv", index=False)
    plot_comparison(table, compare / "comparison.png")
    cross = out / "cross"
    cross.mkdir()
    (cross / "summary.json").write_text(json.dumps({
        "family": "cnn", "train_corpus": "synthetic", "test_corpus": "emodb", "protocol": "cross-corpus",
        "folds_run": [0], "dropped_labels": {"train_only": [], "test_only": ["boredom"]},
        **{k: {"mean": 0.432, "std": 0.0} for k in ("ua", "wa", "macro_f1")}}))

    annotations = out / "annotations"
    annotations.mkdir()
    segments = pd.DataFrame({"uri": ["a.wav"] * 3, "start_s": [0.0, 1.5, 3.0], "end_s": [3.0, 4.5, 6.0],
                             "label": ["anger"] * 3, "confidence": [0.9] * 3,
                             **{f"prob_{lb}": [1 / 3] * 3 for lb in LABELS}})
    files = pd.DataFrame({"uri": ["a.wav", "b.txt"], "status": ["ok", "error"], "label": ["anger", None]})
    plot_timeline(segments, "a.wav", str(annotations / "timeline.png"))
    plot_label_distribution(files, str(annotations / "label_distribution.png"))
    (annotations / "annotation_summary.json").write_text(json.dumps({"files": 2, "ok": 1, "errors": 1}))
    (out / "throughput.json").write_text(json.dumps({"endpoint annotation (audio s per wall s)": 12.5}))
    return out


def test_report_has_every_section_with_embedded_images(result_dir):
    path = render_report(result_dir)
    report = parse(path)
    assert list(report.images) == [sid for sid, _, _ in SECTIONS]
    assert report.missing == set()
    for section in ("corpus", "search", "models", "evaluation", "annotation"):
        assert report.images[section], f"no image in section {section}"
    for src in (s for images in report.images.values() for s in images):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    text = path.read_text()
    splits = text[text.index('<section id="splits">'):text.index('<section id="search">')]
    assert "<td>train</td>" in splits and "<td>test</td>" in splits and "synthetic:10" in splits
    assert "ensemble" in text and "0.800" in text
    evaluation = text[text.index('<section id="evaluation">'):text.index('<section id="annotation">')]
    assert "<td>rezonet</td>" in evaluation and "0.61" in evaluation  # the comparison table
    assert "synthetic -&gt; emodb" in evaluation and "0.432 ± 0.000" in evaluation and "boredom" in evaluation


def test_report_command_and_missing_sections(tmp_path, result_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["report", "--from", str(empty)]) == 0
    report = parse(empty / "report.html")
    assert report.missing == {sid for sid, _, _ in SECTIONS}  # says what is missing instead of failing

    out = tmp_path / "elsewhere.html"
    assert cli.main(["report", "--from", str(result_dir), "--out", str(out)]) == 0
    assert parse(out).missing == set()


def test_report_headline_first_and_numbers_read_well(result_dir):
    text = render_report(result_dir).read_text()
    assert text.index('<section id="headline">') < text.index('<section id="corpus">')
    headline = text[text.index('<section id="headline">'):text.index('<section id="corpus">')]
    assert "UA 0.800" in headline and "cnn: val UA 0.800, test UA 0.800" in headline and "files 2" in headline
    assert ">nan<" not in text.lower() and "<td>0.000</td>" not in text  # no NaN cells, no rounded-away values
    from ser_ray.report.html import number

    assert [number(x) for x in (1.3e-4, 0.98765, 12.345, 1234, float("nan"))] == ["1.3e-04", "0.988", "12.35",
                                                                                  "1,234", "–"]


def headless_chromium(*args: str):
    """A headless Chromium driven by selenium where Debian's chromium + chromium-driver and selenium are
    installed; the calling test is skipped elsewhere."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", *args):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_report_renders_in_a_headless_browser(result_dir, tmp_path):
    """What a person sees: the headline on top, every image decoded, no table wider than the page.
    Runs where Debian's chromium + chromium-driver and selenium are installed; skipped elsewhere."""
    browser = headless_chromium("--window-size=1280,1600")  # skips where there is no browser
    from selenium.webdriver.common.by import By
    path = render_report(result_dir, tmp_path / "report.html")
    try:
        browser.get(path.as_uri())
        headline = browser.find_element(By.ID, "headline")
        assert headline.is_displayed() and "UA 0.800" in headline.text
        assert headline.location["y"] < browser.find_element(By.ID, "corpus").location["y"]
        widths = browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
        assert len(widths) >= 5 and min(widths) > 0  # every embedded PNG decoded
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the page scrolls sideways by {overflow} px"
        browser.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def archive_output(tmp_path_factory):
    """A real annotation output (the writer's committed parts) over real WAV files."""
    import soundfile as sf

    from ser_ray.annotate.writer import ResultWriter

    root = tmp_path_factory.mktemp("archive")
    audio = root / "audio"
    audio.mkdir()
    for name in ("a.wav", "c.wav"):
        sf.write(audio / name, np.zeros(16000 * 6, dtype=np.float32), 16000)
    (audio / "b.wav").write_bytes(b"not audio")
    a, b, c = (str(audio / n) for n in ("a.wav", "b.wav", "c.wav"))
    probs = {f"prob_{lb}": 1 / 3 for lb in LABELS}
    segments = [{"uri": a, "start_s": s, "end_s": s + 3.0, "label": lb, "confidence": conf, **probs}
                for s, lb, conf in ((0.0, "anger", 0.9), (1.5, "sadness", 0.4), (3.0, "anger", 0.7))]
    files = [{"uri": a, "status": "ok", "label": "anger", "n_segments": 3},
             {"uri": b, "status": "error", "label": None, "error": "not an audio file", "n_segments": 0},
             {"uri": c, "status": "ok", "label": None, "n_segments": 0}]
    out = root / "annotations"
    with ResultWriter(str(out)) as writer:
        writer.commit(files, segments)
    return out


def test_archive_page_lists_every_file_with_its_windows(archive_output, tmp_path):
    from ser_ray.annotate.commands import write_page

    page = write_page(str(archive_output))
    assert page == str(archive_output / "archive.html")
    text = Path(page).read_text()
    assert text.count('class="file"') == 3  # one block per input file, errors and silence included
    assert "not an audio file" in text and "no speech found" in text
    assert text.count("<rect ") == 3 and text.count('title="play this window"') == 3
    assert 'data-src="../audio/a.wav"' in text  # relative to the page, so both can move together
    assert write_page(str(archive_output), "none") is None
    assert write_page(str(tmp_path / "empty")) is None  # nothing committed: no page


def test_archive_page_filters_and_plays_in_a_headless_browser(archive_output, tmp_path):
    """Filter by label and confidence, click a window and the player loads that recording at that range.
    Runs where Debian's chromium + chromium-driver and selenium are installed; skipped elsewhere."""
    import time

    from ser_ray.annotate.commands import write_page

    browser = headless_chromium("--window-size=1280,1000", "--autoplay-policy=no-user-gesture-required",
                                "--allow-file-access-from-files")  # skips where there is no browser
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    page = Path(write_page(str(archive_output)))
    try:
        browser.get(page.as_uri())
        shown = lambda: browser.find_element(By.ID, "shown").text  # noqa: E731
        assert shown() == "3"
        Select(browser.find_element(By.ID, "label")).select_by_value("sadness")
        assert shown() == "1"
        Select(browser.find_element(By.ID, "label")).select_by_value("")
        browser.execute_script("const c = document.getElementById('conf'); c.value = '0.8';"
                               "c.dispatchEvent(new Event('input'))")
        assert shown() == "1"
        dimmed = browser.execute_script("return document.querySelectorAll('rect.off').length")
        assert dimmed == 2
        browser.find_elements(By.CSS_SELECTOR, "svg.timeline rect")[1].click()  # the 1.5–4.5 s window
        player = browser.find_element(By.ID, "player")
        assert player.get_attribute("src").endswith("/audio/a.wav#t=1.5,4.5")
        deadline = time.monotonic() + 10
        while browser.execute_script("return arguments[0].readyState", player) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert browser.execute_script("return arguments[0].duration", player) == pytest.approx(6.0, abs=0.05)
        assert browser.execute_script("return arguments[0].currentTime", player) == pytest.approx(1.5, abs=0.3)
        browser.save_screenshot(str(tmp_path / "archive.png"))
        assert (tmp_path / "archive.png").stat().st_size > 10_000
    finally:
        browser.quit()


def test_the_split_section_reads_a_search_experiment_when_there_is_no_folds_json(tmp_path):
    """`ser-ray run` leaves <experiment>/split.parquet and best.json, no folds.json."""
    experiment = tmp_path / "search"
    experiment.mkdir()
    pd.DataFrame({"speaker": ["a", "a", "b", "c", "d"], "split": ["train", "train", "train", "val", "test"],
                  "emotion": "anger"}).to_parquet(experiment / "split.parquet")
    (experiment / "best.json").write_text(json.dumps({"_search": {"split": {"protocol": "kfold", "leaky": False}}}))
    text = render_report(tmp_path).read_text()
    section = text[text.index('id="splits"'):text.index('id="search"')]
    assert "kfold" in section and "LEAKY" not in section
    assert ">a, b<" in section and ">c<" in section and ">d<" in section  # speakers per side
