"""The page in a real browser (Debian's headless Chromium), opened from file:// and through
`previewd serve`: it fills in live, moves with the arrow keys, opens the full image on a click,
shows queued and failed cells, and asks for nothing outside its folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from previewd import outbox
from previewd.instance import render_config
from previewd.manifest import RenderEntry
from previewd.spec import LoraSpec, RenderSpec
from previewd.tasks import OutputTarget, RenderTask, image_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from browser import Browser, find_browser  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = 6
SIDE = 256


@pytest.fixture(scope="module")
def browser():
    binary = find_browser()
    if binary is None:
        pytest.skip("no Chromium found (apt-get install chromium-headless-shell; .ci/run installs it)")
    chromium = Browser(binary)
    yield chromium
    chromium.close()


def _target(run: Path, step: int, index: int) -> OutputTarget:
    checkpoint = f"my_run_{step:09d}.safetensors"
    return OutputTarget(out_dir=str(run / "previews"), image_name=image_name(step, checkpoint, index, "png"),
                        title="my_run", source=str(run / "config.yaml"), checkpoint=checkpoint, step=step,
                        prompt_index=index, job_dir=str(run))


def _prompt(index: int) -> str:
    return f"p3r5on portrait number {index}, studio light, 85mm, shallow depth of field, film grain"


def _render(run: Path, step: int, index: int, *, wait: bool = True) -> str:
    target = _target(run, step, index)
    entry = RenderEntry(model="qwen_image_2512", checkpoint=target.checkpoint, step=step, prompt_index=index,
                        prompt=_prompt(index), seed=42, width=SIDE, height=SIDE, sample_steps=25,
                        guidance_scale=4.0, network_multiplier=1.0, parity="aitk")
    colour = (40 * index % 256, step % 256, 120)
    return outbox.write_render(target, Image.new("RGB", (SIDE, SIDE), colour), entry, wait=wait).image


def _task(run: Path, step: int, index: int) -> RenderTask:
    return RenderTask(spec=RenderSpec(model="qwen_image_2512", prompt=_prompt(index), width=SIDE, height=SIDE,
                                      lora=LoraSpec(path="x.safetensors")), target=_target(run, step, index))


@pytest.fixture
def run(tmp_path) -> Path:
    """A training run as previewd leaves it mid-way: two checkpoints rendered, ai-toolkit's own samples
    of the first, a third checkpoint queued, one of its cells failed."""
    run = tmp_path / "inbox" / "my_run"
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text("job: extension\n")
    for index in range(PROMPTS):
        Image.new("RGB", (SIDE, SIDE), (40 * index % 256, 250, 110)).save(run / "samples" / f"1__000000250_{index}.jpg")
    for step in (250, 500):
        for index in range(PROMPTS):
            _render(run, step, index, wait=False)
    for index in range(PROMPTS):
        outbox.record_cell(_task(run, 750, index), job_id=100 + index,
                           error="PipelineOutOfMemory: CUDA out of memory" if index == 2 else None)
    outbox.flush()
    return run


def _exercise(browser: Browser, url: str, run: Path, origin: str, shot: Path) -> None:
    browser.open(url)
    browser.wait_for("document.querySelectorAll('td.c.done').length === 12")
    browser.eval("window.marker = 'not reloaded'")
    assert browser.eval("document.querySelectorAll('td.c.pending').length") == PROMPTS - 1
    failed = browser.eval("document.querySelector('td.c.failed').textContent")
    assert "failed" in failed and "CUDA out of memory" in failed
    # Columns shrink to fit: six prompts side by side in a 1400 px window, no horizontal scrolling.
    assert browser.eval("document.getElementById('wrap').scrollWidth <= document.getElementById('wrap').clientWidth")
    assert browser.eval("document.querySelector('td.c.done img').getAttribute('src').startsWith('.thumbs/')")

    # A render that arrives after the page was opened appears without a reload.
    name = _render(run, 750, 0)
    browser.wait_for(f"!!document.querySelector('img[data-full=\"{name}\"]')", timeout=10)
    assert browser.eval("window.marker") == "not reloaded"
    assert browser.eval("document.querySelectorAll('td.c.done').length") == 13

    # ai-toolkit's viewer keys: ↑/↓ step, ←/→ prompt.
    def selected():
        return browser.eval("(() => { const td = document.querySelector('td.sel'); "
                            "return td ? [+td.dataset.r, +td.dataset.c] : null; })()")

    browser.key("ArrowDown")
    assert selected() == [0, 0]
    for key, expected in (("ArrowRight", [0, 1]), ("ArrowRight", [0, 2]), ("ArrowDown", [1, 2]),
                          ("ArrowLeft", [1, 1]), ("ArrowUp", [0, 1])):
        browser.key(key)
        assert selected() == expected, key
    browser.key("Escape")
    assert selected() is None

    # A click opens the full image; Esc closes it.
    target = image_name(500, "my_run_000000500.safetensors", 3, "png")
    browser.click(f"img[data-full='{target}']")
    browser.wait_for("!document.getElementById('viewer').hidden && document.getElementById('vours').complete")
    assert browser.eval("document.getElementById('vours').getAttribute('src')") == target
    assert browser.eval("document.getElementById('vours').naturalWidth") == SIDE
    browser.key("ArrowUp")  # the viewer moves with the selection
    assert browser.eval("document.getElementById('vours').getAttribute('src')") == image_name(
        250, "my_run_000000250.safetensors", 3, "png")
    browser.eval("document.querySelector('#vmodes [data-mode=swipe]').click()")
    browser.wait_for("document.getElementById('vtheirs').complete && !document.getElementById('vtheirs').hidden")
    assert browser.eval("document.getElementById('vtheirs').naturalWidth") == SIDE
    assert "inset" in browser.eval("document.getElementById('vtheirs').style.clipPath")
    browser.key("Escape")
    assert browser.eval("document.getElementById('viewer').hidden")

    # Headers stay in view while the grid scrolls (here made larger than the window on purpose).
    zoom = "(z => { z.value = %d; z.dispatchEvent(new Event('input')); })(document.getElementById('zoom'))"
    browser.eval(zoom % 512)
    browser.eval("(w => { w.scrollTop = 300; w.scrollLeft = 400; })(document.getElementById('wrap'))")
    browser.wait_for("document.getElementById('wrap').scrollTop > 0 && document.getElementById('wrap').scrollLeft > 0")
    assert browser.eval("Math.abs(document.querySelector('thead th:not(.corner)').getBoundingClientRect().top - "
                        "document.getElementById('wrap').getBoundingClientRect().top) < 1")
    assert browser.eval("Math.abs(document.querySelector('tbody th').getBoundingClientRect().left - "
                        "document.getElementById('wrap').getBoundingClientRect().left) < 1")
    browser.eval(zoom % 0)

    # The ai-toolkit column and the difference view.
    browser.eval("document.getElementById('aitk').click()")
    browser.wait_for("document.querySelectorAll('td.c.done .t').length === 13 + 6")
    browser.eval("document.getElementById('diff').click()")
    browser.wait_for("document.querySelectorAll('.t.diff img.blend').length === 6")
    browser.eval("document.getElementById('diff').click(); document.getElementById('aitk').click()")
    browser.screenshot(shot)

    requests = browser.requests
    assert requests and all(url.startswith(origin) for url in requests), \
        [url for url in requests if not url.startswith(origin)]
    assert any(url.endswith("manifest.js") or "manifest.js?" in url for url in requests)
    assert any("/samples/1__000000250_3.jpg" in url for url in requests)


def test_the_page_from_file(browser, run, tmp_path):
    _exercise(browser, (run / "previews" / "index.html").as_uri(), run, "file://", tmp_path / "file.png")
    with Image.open(tmp_path / "file.png") as shot:
        assert shot.size == (1400, 900)


def test_the_page_through_previewd_serve(browser, run, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(render_config())
    server = subprocess.Popen([sys.executable, "-m", "previewd", "serve", "-c", str(config), "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        assert "serving previews read-only on http://127.0.0.1:" in line, line
        origin = line.split()[4].rstrip("/")
        browser.open(origin + "/")
        link = browser.eval("document.querySelector('a').getAttribute('href')")
        assert link == "/1/my_run/previews/"
        _exercise(browser, origin + link, run, origin, tmp_path / "served.png")
        forbidden = browser.eval(f"fetch({json.dumps(origin + '/1/my_run/config.yaml')}).then(r => r.status)")
        assert forbidden == 404
    finally:
        server.terminate()
        server.wait(timeout=10)
