"""The search page (demo/app.py) in a real browser: headless Chromium driven by playwright types a
query into the page served on 127.0.0.1 and checks that the result images and both attention
panels render. Skipped, with the reason, where Chromium or playwright is missing."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_retrieval import make_tiny_folders

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
QUERY = "a small red circle left of a blue square"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_app(tmp_path):
    """demo/app.py serving the tiny folders on 127.0.0.1: yields its URL once it answers."""
    make_tiny_folders(tmp_path)
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, str(REPO / "demo" / "app.py"), str(tmp_path / "mvam"), "--uarda_model", str(tmp_path / "uarda"),
         "--data", str(tmp_path / "data"), "--index_dir", str(tmp_path / "index"), "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, f"the app exited:\n{server.stdout.read()[-3000:]}"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the app did not start serving within 180 s"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium browser (Debian: apt-get install -y chromium)")
def test_search_page_shows_results_and_attention_panels(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with served_app(tmp_path) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.locator("#query textarea").fill(QUERY)
        page.locator("#search").click()
        loaded = "s => { const i = document.querySelector(s); return !!i && i.complete && i.naturalWidth > 0; }"
        for rank in range(4):  # every result: the image, MVAM's views, UARDA's words
            for panel in ("result", "views", "words"):
                page.wait_for_function(loaded, arg=f"#{panel}-{rank} img", timeout=60_000)
        sizes = {panel: page.eval_on_selector(f"#{panel}-0 img", "i => [i.naturalWidth, i.naturalHeight]")
                 for panel in ("result", "views", "words")}
        assert sizes["views"][0] > 300 and sizes["words"][0] > 300, sizes  # figures, not icons
        status = page.inner_text("#status")
        assert QUERY in status and "reranked by UARDA" in status, status
        assert page.inner_text("#caption-0").startswith("1. image")
        page.screenshot(path=str(tmp_path / "screenshot.png"), full_page=True)
        browser.close()
    assert (tmp_path / "screenshot.png").stat().st_size > 10_000


def test_search_page_serves_its_figures_and_no_other_file(tmp_path):
    """The page's figures reach a client; any other file of the machine's temp folder does not."""
    from gradio_client import Client

    private = tmp_path / "private.txt"  # tmp_path lies in tempfile.gettempdir()
    private.write_text("not for the page's visitors")
    with served_app(tmp_path) as url:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}gradio_api/file={private}", timeout=30)
        assert refused.value.code == 403
        outputs = Client(url, verbose=False).predict(QUERY, True, fn_index=0)
    caption, image, views, words = outputs[:4]  # the first result (the API leaves the layout out)
    assert caption.startswith("**1.** image")
    for figure, width in ((image, 128), (views, 300), (words, 300)):
        with Image.open(figure) as drawn:
            assert drawn.width >= width


def _load_app():
    """demo/app.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_mvam_demo_app", REPO / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_search_page_draws_every_result_of_a_query(tmp_path):
    """What the page does on a query, without a browser: every result slot gets the gallery image
    and both attention figures, in the order the index ranks them."""
    app = _load_app()
    make_tiny_folders(tmp_path)
    args = app.parse_arguments([str(tmp_path / "mvam"), "--uarda_model", str(tmp_path / "uarda"),
                                "--data", str(tmp_path / "data"), "--index_dir", str(tmp_path / "index")])
    page = app.SearchPage(app.open_index(args))
    outputs = page.search(QUERY, True)
    assert len(outputs) == 5 * app.RESULTS + 1 and QUERY in outputs[-1] and "reranked by UARDA" in outputs[-1]
    hits = page.index.search(texts=[QUERY], k=app.RESULTS, shortlist_size=app.SHORTLIST)
    for rank in range(app.RESULTS):
        _, caption, image, views, words = outputs[5 * rank : 5 * rank + 5]
        assert caption.startswith(f"**{rank + 1}.** image `{hits.ids[0][rank]}`")
        assert isinstance(image, Image.Image) and image.width >= 128  # small images are shown enlarged
        for figure in (views, words):
            with Image.open(figure) as drawn:
                assert drawn.width > 300


def test_search_page_indexes_a_model_trained_again(tmp_path):
    """The kept index is built again when the model folder holds other weights than it was built
    with (the same paths and data otherwise), so queries never meet another model's embeddings."""
    import torch

    from hf_mvam import MVAMModel
    from hf_mvam.retrieval import RetrievalIndex, load_split

    app = _load_app()
    make_tiny_folders(tmp_path)
    args = app.parse_arguments([str(tmp_path / "mvam"), "--data", str(tmp_path / "data"),
                                "--index_dir", str(tmp_path / "index")])
    app.open_index(args)
    model = MVAMModel.from_pretrained(tmp_path / "mvam")
    with torch.no_grad():
        model.image_views.view_projection.mul_(-1.0)  # "trained again": other image embeddings
    model.save_pretrained(tmp_path / "mvam")
    again = app.open_index(args)
    split, _ = load_split(tmp_path / "mvam", tmp_path / "data")
    fresh = RetrievalIndex.build(tmp_path / "fresh", split, tmp_path / "mvam")
    found, expected = again.search(texts=[QUERY], k=5), fresh.search(texts=[QUERY], k=5)
    assert found.ids == expected.ids
    np.testing.assert_allclose(found.scores, expected.scores, rtol=0, atol=1e-6)
