"""Run reports and retrieval pages: built from real tiny Beam runs, checked in the HTML, against pyarrow and the
evaluation functions, and rendered in a real headless Chromium (Debian's chromium + chromium-driver)."""

import base64
import html as htmllib
import io
import json
import os
import pickle
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from beam_job import cli
from beam_job.imaging import decode_image
from beam_job.report import run as run_report
from beam_job.report.html import histogram_svg
from beam_job.report.retrieval import main as retrieval_main
from beam_job.report.retrieval import write_retrieval_report
from beam_job.retrieval import cli as rcli
from beam_job.retrieval import evaluate as ev

from helpers import synthetic_output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "examples", "images")
TINY = ["--preset", "tiny", "--no_progress"]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


# --------------------------------------------------------------------------------------------- helpers


class _Tags(HTMLParser):
    """Start tags in document order as (tag, attrs dict); svg circles remember the enclosing svg.kp's image id."""

    def __init__(self):
        super().__init__()
        self.tags, self._svg = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg" and "kp" in (a.get("class") or ""):
            self._svg = a
        if tag == "circle" and self._svg is not None:
            a["_svg"] = self._svg
        self.tags.append((tag, a))

    def handle_endtag(self, tag):
        if tag == "svg":
            self._svg = None


def tags(text, name=None):
    parser = _Tags()
    parser.feed(text)
    return [a for t, a in parser.tags if name is None or t == name]


def shown_counts(text):
    """{data-key: number} of the count cells of a run report."""
    return {k: int(v) for k, v in re.findall(r'<span data-key="([^"]+)">(\d+)</span>', text)}


def output_counts_from_shards(out):
    """The whole output's current counts, computed here independently with pyarrow."""
    fids = set(pq.read_table(os.path.join(out, "features"), columns=["image_id"]).column(0).to_pylist())
    failed = set(pq.read_table(os.path.join(out, "failures"), columns=["image_id"]).column(0).to_pylist()) - fids
    return {"output.images": len(fids | failed), "output.features": len(fids), "output.failures": len(failed)}


def summaries(out):
    runs = {}
    for rid in os.listdir(os.path.join(out, "runs")):
        with open(os.path.join(out, "runs", rid, "summary.json")) as fh:
            runs[rid] = json.load(fh)
    return runs


def read_report(out, run_id):
    with open(os.path.join(out, "runs", run_id, "report.html"), encoding="utf-8") as fh:
        return fh.read()


# --------------------------------------------------------------------------------------------- two real runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Run 1: the demo manifest (4 photos + the truncated JPEG) plus a photo stored landscape with EXIF
    orientation 6 (shown portrait). Run 2, same output with --skip_existing: one new photo, the truncated
    JPEG fails again."""
    root = tmp_path_factory.mktemp("report")
    rotated = root / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(os.path.join(DEMO, "coffee.jpg")).save(rotated, quality=90, exif=exif)
    lines = ["image_id,path"] + [f"{n},{os.path.join(DEMO, n + '.jpg')}" for n in
                                 ("astronaut", "coffee", "chelsea", "rocket")]
    lines += [f"truncated_download,{os.path.join(DEMO, 'truncated_download.jpg')}", f"rotated,{rotated}"]
    m1, m2 = root / "m1.csv", root / "m2.csv"
    m1.write_text("\n".join(lines) + "\n")
    flipped = root / "flipped.png"
    Image.open(os.path.join(DEMO, "chelsea.jpg")).transpose(Image.FLIP_LEFT_RIGHT).save(flipped)
    m2.write_text("\n".join([*lines, f"flipped,{flipped}"]) + "\n")
    out = str(root / "out")
    first = cli.run(["--manifest", str(m1), "--output", out, *TINY, "--row_group_size", "2"])
    first_report = read_report(out, first.job.run_id)  # as written at the end of run 1
    second = cli.run(["--manifest", str(m2), "--output", out, *TINY, "--skip_existing"])
    return {"root": root, "out": out, "first": first.job.run_id, "second": second.job.run_id,
            "first_report": first_report, "rotated": str(rotated)}


def test_each_run_ends_with_a_report_whose_counts_equal_the_summary(two_runs):
    out = two_runs["out"]
    runs = summaries(out)
    assert set(runs) == {two_runs["first"], two_runs["second"]}
    pages = [(two_runs["first"], two_runs["first_report"]), (two_runs["second"], read_report(out, two_runs["second"]))]
    for rid, text in pages:
        shown = shown_counts(text)
        c = runs[rid]["counts"]
        for key in ("listed", "processed", "features", "failures", "skipped_existing", "duplicate_inputs"):
            assert shown[f"run.{key}"] == c[key], key
        assert "id=\"untrained-warning\"" in text
    # run 1 saw only itself; run 2's "whole output" is the union, with the twice-failed image counted once
    first = shown_counts(two_runs["first_report"])
    assert (first["output.images"], first["output.features"], first["output.failures"]) == (6, 5, 1)
    second = shown_counts(read_report(out, two_runs["second"]))
    assert {k: v for k, v in second.items() if k.startswith("output.")} == output_counts_from_shards(out)
    assert (second["output.images"], second["output.features"], second["output.failures"]) == (7, 6, 1)
    assert (second["run.skipped_existing"], second["run.features"], second["run.failures"]) == (5, 1, 1)


def test_the_truncated_jpeg_is_listed_with_stage_error_type_path_and_message(two_runs):
    text = two_runs["first_report"]
    section = text[text.index("id=\"failures-table\""):]
    section = section[: section.index("</table>")]
    assert 'data-stage="decode"' in section and 'data-error-type="ImageDecodeError"' in section
    assert "truncated_download.jpg" in section and "image file is truncated" in htmllib.unescape(section)
    assert shown_counts(text)["failures.run.decode/ImageDecodeError"] == 1


def test_drawn_points_are_the_stored_locations_on_an_exif_oriented_thumbnail(two_runs):
    text = two_runs["first_report"]
    table = pq.read_table(os.path.join(two_runs["out"], "features"),
                          columns=["image_id", "original_height", "original_width", "locations", "scales"])
    rows = {r["image_id"]: r for r in table.to_pylist() if r["image_id"] != "flipped"}  # flipped: run 2
    parsed = _Tags()
    parsed.feed(text)
    kp = [a for t, a in parsed.tags if t == "svg" and "kp" in (a.get("class") or "")]
    # five feature rows < SAMPLE_IMAGES: all are drawn, in SHA-1 order of their ids
    assert [a["data-image-id"] for a in kp] == sorted(rows, key=run_report.sample_key)
    circles = [a for t, a in parsed.tags if t == "circle"]
    imgs = {a["alt"]: a for a in tags(text, "img")}
    for a in kp:
        iid = a["data-image-id"]
        row = rows[iid]
        h, w = row["original_height"], row["original_width"]
        tw, th = int(a["data-thumb-width"]), int(a["data-thumb-height"])
        assert (int(a["data-original-height"]), int(a["data-original-width"])) == (h, w)
        # the embedded thumbnail has exactly the overlay's size and the image's aspect
        thumb = Image.open(io.BytesIO(base64.b64decode(imgs[iid]["src"].split(",", 1)[1])))
        assert thumb.size == (tw, th) and abs(tw / th - w / h) < 0.02
        mine = [c for c in circles if c.get("_svg") is a]
        stored = np.asarray(row["locations"], np.float64).reshape(-1, 2)
        assert len(mine) == len(stored) > 0
        drawn_yx = np.array([[float(c["data-y"]), float(c["data-x"])] for c in mine])
        order = np.lexsort(drawn_yx.T[::-1])
        np.testing.assert_allclose(drawn_yx[order], stored[np.lexsort(stored.T[::-1])], atol=0.006)
        cxcy = np.array([[float(c["cx"]), float(c["cy"])] for c in mine])  # thumbnail px, to 0.1
        np.testing.assert_allclose(cxcy[:, 0], drawn_yx[:, 1] * tw / w, atol=0.06)
        np.testing.assert_allclose(cxcy[:, 1], drawn_yx[:, 0] * th / h, atol=0.06)
        assert (cxcy >= -1).all() and (cxcy[:, 0] <= tw + 1).all() and (cxcy[:, 1] <= th + 1).all()
    # the EXIF photo: stored 600x400 landscape, its row and its thumbnail are portrait and upright
    rot = rows["rotated"]
    assert (rot["original_height"], rot["original_width"]) == (600, 400)
    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(imgs["rotated"]["src"].split(",", 1)[1]))).convert("RGB"),
                       np.float64)
    upright = Image.fromarray(decode_image(open(two_runs["rotated"], "rb").read())).resize(
        (thumb.shape[1], thumb.shape[0]), Image.BILINEAR)
    assert np.abs(thumb - np.asarray(upright, np.float64)).mean() < 8


def test_report_command_latest_run_by_id_and_output_counts_from_the_summary(two_runs, tmp_path, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(two_runs["out"], out)
    os.remove(os.path.join(out, "runs", two_runs["second"], "report.html"))
    assert cli.main(["report", out]) == 0
    assert capsys.readouterr().out.strip().endswith(os.path.join("runs", two_runs["second"], "report.html"))
    # an earlier run rebuilt now: its own counts, the output as its summary saw it, a link to the later report
    assert cli.main(["report", out, "--run_id", two_runs["first"]]) == 0
    text = read_report(out, two_runs["first"])
    shown = shown_counts(text)
    first = summaries(out)[two_runs["first"]]
    assert (shown["run.features"], shown["output.features"], shown["output.images"]) == (5, 5, 6)
    assert (shown["output.images"], shown["output.features"], shown["output.failures"]) == tuple(
        first["output"][k] for k in ("images", "features", "failures"))
    assert f'href="../{two_runs["second"]}/report.html"' in text
    # a summary with the "output" section: shown as is (here made-up numbers, to see where they come from)
    path = os.path.join(out, "runs", two_runs["second"], "summary.json")
    data = json.load(open(path))
    data["output"] = {"images": 70, "features": 60, "failures": 10}
    json.dump(data, open(path, "w"))
    run_report.write_run_report(out)
    shown = shown_counts(read_report(out, two_runs["second"]))
    assert (shown["output.images"], shown["output.features"], shown["output.failures"]) == (70, 60, 10)
    capsys.readouterr()
    assert cli.main(["report", out, "--run_id", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("delg-extract: error: run 'nope' not found") and "\n" not in err
    assert cli.main(["report", str(tmp_path / "empty")]) == 2


# --------------------------------------------------------------------------------------------- bounded reads


class ColumnSpy:
    """Records the columns (and row groups) every pyarrow Parquet read asks for."""

    def __init__(self, monkeypatch):
        self.calls, self.returned = [], []  # what each read asked for, and the columns pyarrow gave back
        spy = self

        def wrap(name):
            original = getattr(pq.ParquetFile, name)

            def recorder(self_, *args, **kwargs):
                groups = args[0] if args and name != "read" else None
                result = original(self_, *args, **kwargs)
                spy.calls.append((name, frozenset(kwargs.get("columns") or ()), groups))
                spy.returned.append(frozenset(getattr(result, "column_names", ())))
                return result

            monkeypatch.setattr(pq.ParquetFile, name, recorder)

        for name in ("read", "read_row_group", "read_row_groups", "iter_batches"):
            wrap(name)
        original_read_table = pq.read_table

        def read_table(*args, **kwargs):
            result = original_read_table(*args, **kwargs)
            spy.calls.append(("read_table", frozenset(kwargs.get("columns") or ()), None))
            spy.returned.append(frozenset(result.column_names))
            return result

        monkeypatch.setattr(pq, "read_table", read_table)


def test_histogram_of_a_single_value_is_one_bar_with_one_tick_at_it():
    """Every image with 1000 keypoints: one bar centred on 1000, the only tick 1000 (not an axis 999-1002)."""
    svg = histogram_svg([1000] * 7, "Keypoints per image", "keypoints", "keypoints", integer=True)
    bars = [a for a in tags(svg, "rect") if "data-count" in a]
    assert [int(a["data-count"]) for a in bars] == [7]
    ticks = re.findall(r'<text x="([\d.]+)" y="[\d.]+" font-size="10" text-anchor="middle">(\d+)</text>', svg)
    assert [t for _, t in ticks] == ["1000"]
    x, width = float(bars[0]["x"]), float(bars[0]["width"])
    assert abs(x + (width + 1) / 2 - float(ticks[0][0])) < 1  # the tick under the bar's centre
    few = histogram_svg([3, 4, 4, 5], "t", "x", "n", integer=True)  # a few values: one bar each, ticks at them
    assert [int(a["data-count"]) for a in tags(few, "rect") if "data-count" in a] == [1, 2, 1]
    assert re.findall(r'text-anchor="middle">(\d+)</text>', few) == ["3", "4", "5"]


def test_report_reads_no_descriptor_column_and_keypoints_only_for_the_sample(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    rid = synthetic_output(out)
    monkeypatch.setattr(run_report, "SAMPLE_IMAGES", 3)
    monkeypatch.setattr(run_report, "ATTENTION_SAMPLE_ROWS", 7)
    spy = ColumnSpy(monkeypatch)
    reader = run_report.ColumnReader()
    path = run_report.write_run_report(out, reader=reader)
    text = open(path, encoding="utf-8").read()
    assert spy.calls and reader.requests
    asked = [set(cols) for _, cols, _ in spy.calls]
    assert all(cols for cols in asked), "every read names its columns"
    assert not any(cols & {"descriptors", "global_descriptor"} for cols in asked + spy.returned)
    # locations / scales / attention: only whole row groups holding sampled rows (4 rows per group here)
    heavy = [(name, cols, groups) for name, cols, groups in spy.calls if cols & {"locations", "scales", "attention"}]
    assert all(name == "read_row_groups" and groups for name, _, groups in heavy)
    kp_groups = sum(len(g) for _, cols, g in heavy if "locations" in cols)
    att_groups = sum(len(g) for _, cols, g in heavy if "locations" not in cols)
    assert 1 <= kp_groups <= 3 and 1 <= att_groups <= 7
    ids = sorted((f"img-{i:04d}" for i in range(60)), key=run_report.sample_key)
    assert [a["data-image-id"] for a in tags(text, "svg") if "kp" in (a.get("class") or "")] == ids[:3]
    assert shown_counts(text)["run.features"] == 60 and shown_counts(text)["output.features"] == 60
    assert "image not readable" in text  # the sources do not exist: the points are drawn on a blank frame
    assert reader.descriptor_requests() == [] and rid in path


def test_report_of_a_gs_output(gcs_bucket, tmp_path):
    local = str(tmp_path / "out")
    rid = synthetic_output(local, n_rows=10, per_shard=5)
    for dirpath, _, files in os.walk(local):
        for name in files:
            full = os.path.join(dirpath, name)
            gcs_bucket.blob("out/" + os.path.relpath(full, local)).upload_from_filename(full)
    uri = f"gs://{gcs_bucket.name}/out"
    assert run_report.write_run_report(uri) == f"{uri}/runs/{rid}/report.html"
    text = gcs_bucket.blob(f"out/runs/{rid}/report.html").download_as_bytes().decode("utf-8")
    assert shown_counts(text)["output.features"] == 10


# --------------------------------------------------------------------------------------------- retrieval pages


@pytest.fixture(scope="module")
def retrieval(two_runs):
    root = two_runs["root"] / "retrieval"
    root.mkdir()
    index = str(root / "index")
    assert rcli.main(["build", two_runs["out"], index, "--kind", "flat"]) == 0
    queries = root / "queries.csv"
    cat = root / "cat_copy.jpg"  # not indexed: extracted with the shards' model, as `query` does
    shutil.copy(os.path.join(DEMO, "chelsea.jpg"), cat)
    queries.write_text(f"query_id,image_id,path\nastronaut,astronaut,\ncoffee,coffee,\ncat_by_path,,{cat}\n")
    results = str(root / "results.parquet")
    assert rcli.main(["query", index, "--queries", str(queries), "--k", "5", "--rerank", "5", "--output", results]) == 0
    imlist = ["astronaut", "coffee", "chelsea", "rocket", "rotated", "flipped"]
    gnd = {"imlist": imlist, "qimlist": ["astronaut", "coffee", "cat_by_path"], "gnd": [
        {"easy": np.array([3]), "hard": np.array([2]), "junk": np.array([4]), "bbx": None},
        {"easy": np.array([4]), "hard": np.array([], np.int64), "junk": np.array([], np.int64), "bbx": None},
        {"easy": np.array([5]), "hard": np.array([2]), "junk": np.array([], np.int64), "bbx": None}]}
    gnd_path = str(root / "gnd_demo.pkl")
    with open(gnd_path, "wb") as fh:
        pickle.dump(gnd, fh)
    solution = str(root / "solution.csv")
    with open(solution, "w") as fh:
        fh.write("id,images,Usage\nastronaut,rocket chelsea,Public\ncoffee,rotated,Private\ncat_by_path,None,Ignored\n")
    pages = str(root / "pages")
    write_retrieval_report(results, index, pages, queries_file=str(queries), ground_truth=gnd_path, k=5,
                           min_inliers=4)
    return {"root": root, "index": index, "queries": str(queries), "results": results, "gnd": gnd_path,
            "gnd_data": gnd, "solution": solution, "pages": pages}


def query_pages(pages):
    out = {}
    for name in os.listdir(os.path.join(pages, "queries")):
        text = open(os.path.join(pages, "queries", name), encoding="utf-8").read()
        qid = htmllib.unescape(re.search(r"<h1>Query (.*?)</h1>", text).group(1))
        out[qid] = (name, text)
    return out


def test_retrieval_pages_show_results_labels_and_match_pictures(retrieval):
    from beam_job.retrieval.query import read_results

    pages = retrieval["pages"]
    table = read_results(retrieval["results"]).to_pylist()
    per_query = query_pages(pages)
    assert set(per_query) == {"astronaut", "coffee", "cat_by_path"}
    imlist = retrieval["gnd_data"]["imlist"]
    for qi, qid in enumerate(retrieval["gnd_data"]["qimlist"]):
        _name, text = per_query[qid]
        expected = sorted((r for r in table if r["query_id"] == qid), key=lambda r: r["final_rank"])
        tiles = [a for a in tags(text, "div") if "data-rank" in a]
        assert [t["data-image-id"] for t in tiles] == [r["image_id"] for r in expected]
        g = retrieval["gnd_data"]["gnd"][qi]
        for t, r in zip(tiles, expected, strict=True):
            assert t["data-path"] == r["path"] and os.path.basename(r["path"]) in text  # named, not only the id
            assert int(t["data-inliers"]) == r["inliers"]
            assert abs(float(t["data-global-score"]) - r["global_score"]) < 1e-5
            assert ("is-verified" in t["class"]) == (r["inliers"] >= 4)
            i = imlist.index(r["image_id"])
            want = "positive" if i in set(g["easy"]) | set(g["hard"]) else "junk" if i in set(g["junk"]) else "negative"
            assert t["data-label"] == want
        links = [a["href"] for a in tags(text, "a") if a.get("data-match")]
        assert len(links) == len(expected)
        for href in links:  # match pictures: side by side at the page's height, as draw-matches draws them
            pic = Image.open(os.path.join(pages, "queries", href))
            assert pic.format == "JPEG" and pic.height <= 480 and pic.width > pic.height
        for a in tags(text, "img"):
            assert os.path.getsize(os.path.join(pages, "queries", a["src"])) > 0
        assert 'id="untrained-warning"' in text  # the demo runs use the tiny untrained model


def test_retrieval_page_map_equals_eval_revisitop_and_gldv2(retrieval, capsys, tmp_path):
    capsys.readouterr()
    assert rcli.main(["eval-revisitop", retrieval["results"], retrieval["gnd"]]) == 0
    printed = capsys.readouterr().out.strip()
    index = open(os.path.join(retrieval["pages"], "index.html"), encoding="utf-8").read()
    assert htmllib.unescape(re.search(r'<pre id="map-text">(.*?)</pre>', index, re.S).group(1)).strip() == printed
    # per-query AP: the evaluate module's own per-query numbers, in the sortable table
    gnd = ev.load_revisitop_gnd(retrieval["gnd"])
    ranked = ev.ranked_ids_from_table(pq.read_table(retrieval["results"]))
    rankings = ev.rankings_from_results(gnd["qimlist"], ranked, gnd["imlist"])
    _, aps, _, _ = ev.compute_map(rankings, ev.protocol_ground_truth(gnd["gnd"], "medium"))
    rows = re.findall(r'<tr data-query="([^"]+)">(.*?)</tr>', index, re.S)
    shown = {q: re.search(r'data-ap="medium">([^<]*)<', body).group(1) for q, body in rows}
    assert shown == {q: f"{100 * a:.2f}" for q, a in zip(gnd["qimlist"], aps, strict=True)}
    # GLDv2: mAP@100 per split and AP@100 per query as evaluate_gldv2 / gldv2_map_at_k give them
    pages = str(tmp_path / "gld")
    assert retrieval_main(["report", retrieval["results"], "--index", retrieval["index"], "--out", pages,
                           "--queries", retrieval["queries"], "--gnd", retrieval["solution"], "--k", "3",
                           "--no_matches"]) == 0
    text = open(os.path.join(pages, "index.html"), encoding="utf-8").read()
    metrics = ev.evaluate_gldv2(ranked, ev.read_gldv2_solution(retrieval["solution"]))
    assert f"mAP@100 All: {100 * metrics['All']:.2f}" in text
    solution = ev.read_gldv2_solution(retrieval["solution"])
    rel = {**solution["Public"], **solution["Private"]}
    rows = dict(re.findall(r'<tr data-query="([^"]+)">(.*?)</tr>', text, re.S))
    for q, relevant in rel.items():
        ap = ev.gldv2_map_at_k({q: ranked[q]}, {q: relevant})
        assert re.search(r'data-ap="AP@100">([^<]*)<', rows[q]).group(1) == f"{100 * ap:.2f}"
    assert "ignored" in query_pages(pages)["cat_by_path"][1]
    assert not os.path.exists(os.path.join(pages, "matches"))


# --------------------------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium (Debian's package) driven through chromedriver for all browser tests."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    assert not missing, f"{missing} missing: apt-get install chromium chromium-driver (scripts/test.sh does as root)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def render(browser, path, width, shot):
    """Open a local page at a viewport width; save a full-page screenshot; return (console errors, facts)."""
    browser.set_window_size(width, 900)
    browser.get_log("browser")  # drop earlier entries
    browser.get("file://" + path)
    facts = browser.execute_script(
        "return {images: Array.from(document.images).map(i => [i.getAttribute('src').slice(0, 60), i.complete,"
        " i.naturalWidth]), scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,"
        " height: document.documentElement.scrollHeight,"
        " counts: Object.fromEntries(Array.from(document.querySelectorAll('[data-key]')).map(e => [e.dataset.key,"
        " e.textContent]))}")
    height = facts["height"]
    for _ in range(3):  # the window's outer height includes a few pixels of frame: grow until the page fits
        browser.set_window_size(width, min(height + 100, 10000))
        missing = browser.execute_script("return document.documentElement.scrollHeight - window.innerHeight")
        if missing <= 0:
            break
        height += missing
    browser.save_screenshot(str(shot))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    return errors, facts


def test_run_reports_in_chromium_phone_and_desktop(browser, two_runs, tmp_path_factory):
    shots = tmp_path_factory.mktemp("screenshots")
    out = two_runs["out"]
    runs = summaries(out)
    for rid in (two_runs["first"], two_runs["second"]):  # 5 new feature rows, then 1 (the sample is the run's)
        summary = runs[rid]
        path = os.path.join(out, "runs", rid, "report.html")
        for width in (390, 1280):
            shot = shots / f"run-{rid}-{width}.png"
            errors, facts = render(browser, path, width, shot)
            assert errors == []
            assert len(facts["images"]) == min(summary["counts"]["features"], run_report.SAMPLE_IMAGES)
            assert all(complete and natural > 0 for _, complete, natural in facts["images"]), facts["images"]
            assert facts["scrollWidth"] <= facts["innerWidth"] + 1, "no sideways scrolling"
            counts = {k: int(v) for k, v in facts["counts"].items()}
            for key in ("listed", "processed", "features", "failures", "skipped_existing", "duplicate_inputs"):
                assert counts[f"run.{key}"] == summary["counts"][key]
            assert Image.open(shot).width == width
    # the latest report's whole-output numbers are the output's current ones
    assert {k: v for k, v in counts.items() if k.startswith("output.")} == output_counts_from_shards(out)


def test_retrieval_pages_in_chromium_phone_and_desktop(browser, retrieval, tmp_path_factory):
    from selenium.webdriver.common.by import By

    shots = tmp_path_factory.mktemp("screenshots")
    pages = retrieval["pages"]
    for width in (390, 1280):
        for name, path in [("index", os.path.join(pages, "index.html"))] + [
                (q, os.path.join(pages, "queries", f)) for q, (f, _) in sorted(query_pages(pages).items())]:
            errors, facts = render(browser, path, width, shots / f"{name}-{width}.png")
            assert errors == []
            assert facts["images"] and all(c and n > 0 for _, c, n in facts["images"]), (name, facts["images"])
            assert facts["scrollWidth"] <= facts["innerWidth"] + 1, name
    # the match pictures load in the browser too
    text = query_pages(pages)["astronaut"][1]
    href = next(a["href"] for a in tags(text, "a") if a.get("data-match"))
    browser.get("file://" + os.path.normpath(os.path.join(pages, "queries", href)))
    assert browser.execute_script("return document.images[0].naturalWidth") > 0
    # sorting by AP (medium): one click ascending, a second descending, unscored queries last
    browser.get("file://" + os.path.join(pages, "index.html"))
    header = next(th for th in browser.find_elements(By.CSS_SELECTOR, "#queries th") if "AP medium" in th.text)
    column = "td[data-ap='medium']"
    for _ in range(2):
        header.click()
        values = [c.get_attribute("data-value") for c in browser.find_elements(By.CSS_SELECTOR, f"#queries {column}")]
        scored = [float(v) for v in values if v]
        ascending = header.get_attribute("data-dir") == "asc"
        assert scored == sorted(scored, reverse=not ascending) and len(scored) == 3


def test_retrieval_pages_written_to_gs(retrieval, gcs_bucket):
    uri = f"gs://{gcs_bucket.name}/pages"
    assert write_retrieval_report(retrieval["results"], retrieval["index"], uri, queries_file=retrieval["queries"],
                                  k=2, max_queries=1) == f"{uri}/index.html"
    names = sorted(b.name for b in gcs_bucket.list_blobs(prefix="pages/"))
    assert "pages/index.html" in names and len([n for n in names if n.startswith("pages/queries/")]) == 1
    assert len([n for n in names if n.startswith("pages/img/")]) == 3  # the query and its two results
    assert len([n for n in names if n.startswith("pages/matches/")]) == 2
