"""``actmap gallery``: the page, looked at in a real headless Chromium (Debian's, driven by Playwright).

The browser tests build a gallery from known data (a textured image, a map hot on its left half and
0 on its right) and check the screenshot's pixels against the blend computed here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from producer.errors import InvalidMapError
from producer.results import MapResult, bitmap_mask
from tests.support.workers import clean_env
from worker.colormaps import lut
from worker.gallery import image_lookup, render_gallery, s3_presigner, write_gallery
from worker.render import render_png

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SIZE = 224
MAP_SIDE = 14  # stretched 16x over the image: hot up to x=104 (centre of column 6), cold from x=120
HOT = np.s_[:, :88]  # clear of the smooth transition, whatever the browser's upscaling filter
COLD = np.s_[:, 136:]
TOLERANCE = 3  # browser compositing rounds in 8 bits
IMAGE_ID = "val/img 1"
SCRIPT_ID = '<script>alert("x")</script>'
FAILED_ID = "broken"


def textured_image() -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([60 + (xx * 3) % 120, 80 + (yy * 5) % 100, 100 + ((xx + yy) * 2) % 90], -1).astype(
        np.uint8
    )


def half_hot_map() -> np.ndarray:
    cam = np.zeros((MAP_SIDE, MAP_SIDE), np.float32)
    cam[:, : MAP_SIDE // 2] = 1.0
    return cam


def blend(image: np.ndarray, opacity: float) -> np.ndarray:
    """The hot overlay over ``image``: Jet at 255 (128, 0, 0) with the PNG's alpha times the opacity."""
    rgba = lut("jet", True)[255].astype(np.float64)
    alpha = float(rgba[3]) / 255 * opacity
    return np.asarray(image * (1 - alpha) + rgba[:3] * alpha)


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    worst = float(np.abs(actual.astype(np.float64) - expected).max())
    assert worst <= TOLERANCE, f"{what}: off by up to {worst} (mean pixel {actual.reshape(-1, 3).mean(0)})"


@dataclass
class Data:
    image: np.ndarray
    images: Path
    results: Path
    rows: list[dict[str, Any]]
    locator: str


@pytest.fixture
def data(tmp_path: Path) -> Data:
    image = textured_image()
    images, maps = tmp_path / "images", tmp_path / "maps dir"  # a space: locators are percent-encoded
    rows = []
    for image_id in (IMAGE_ID, SCRIPT_ID):
        (images / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(images / f"{image_id}.png")
        png = render_png(half_hot_map())
        path = maps / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        locator = path.as_uri()
        result = MapResult(
            image_id=image_id,
            name=None,
            locator=locator,
            bitmap_mask=bitmap_mask(locator),
            width=MAP_SIDE,
            height=MAP_SIDE,
            bytes=len(png),
            checksum=f"md5:{hashlib.md5(png).hexdigest()}",
        )
        rows.append(result.to_dict())
    Image.fromarray(image).save(images / f"{FAILED_ID}.jpg", quality=95)
    rows.append(MapResult.from_failure(FAILED_ID, None, InvalidMapError("map has NaN")).to_dict())
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Data(image, images, results, rows, rows[0]["locator"])


@pytest.fixture(scope="module")
def browser_context() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is missing (pip install playwright)"
    )
    with sync_api.sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1000, "height": 1200},
            device_scale_factor=1,
        )
        yield context
        context.close()


@dataclass
class Opened:
    page: Any
    requests: list[str]
    problems: list[str]


def open_page(context: Any, html: Path) -> Opened:
    page = context.new_page()
    opened = Opened(page, [], [])

    def on_console(message: Any) -> None:
        if message.type == "error":  # a CSP violation, a missing file
            opened.problems.append(message.text)

    def on_dialog(dialog: Any) -> None:  # an alert() got through
        opened.problems.append(f"dialog {dialog.message}")
        dialog.dismiss()

    page.on("request", lambda request: opened.requests.append(request.url))
    page.on("console", on_console)
    page.on("pageerror", lambda error: opened.problems.append(str(error)))
    page.on("dialog", on_dialog)
    page.goto(html.as_uri())
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    return opened


def shot(card: Any) -> np.ndarray:
    """The card's stage (image and overlay) as screen pixels, cut from a screenshot of the page."""
    box = card.locator(".stage").bounding_box()
    assert (box["width"], box["height"]) == (SIZE, SIZE), "the stage is the image at its own size"
    screen = np.asarray(Image.open(io.BytesIO(card.page.screenshot(full_page=True))).convert("RGB"))
    x, y = round(box["x"]), round(box["y"])  # the browser draws images snapped to whole pixels
    return screen[y : y + SIZE, x : x + SIZE]


def set_range(control: Any, value: float) -> None:
    control.evaluate(
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }", str(value)
    )


def test_the_map_is_stretched_over_its_image_blended_at_the_sliders_opacity_and_toggles_off(
    browser_context: Any, data: Data, tmp_path: Path
) -> None:
    html = write_gallery(tmp_path / "out" / "gallery.html", data.rows, data.images)
    opened = open_page(browser_context, html)
    page = opened.page
    card = page.locator("figure.card").filter(has=page.locator("code.id", has_text=IMAGE_ID))

    # The default opacity, read off the slider: hot half Jet-255 blended, cold half the image itself
    opacity = float(page.locator("#opacity").input_value())
    assert 0 < opacity < 1
    pixels = shot(card)
    assert_close(pixels[HOT], blend(data.image[HOT], opacity), f"hot half at opacity {opacity}")
    assert_close(pixels[COLD], data.image[COLD], "faded half")
    # smooth scaling: between the halves the overlay fades gradually, no hard edge
    # (green: Jet-255 has none, so the overlay darkens it by its alpha; bilinear: 16 px of ramp)
    middle = np.s_[:, 96:128, 1]
    darkening = (data.image[middle] - pixels[middle].astype(float)) / (
        data.image[middle] - blend(data.image, opacity)[middle]
    )
    ramp = ((darkening > 0.1) & (darkening < 0.9)).all(axis=0)
    assert ramp.sum() >= 8, f"expected a gradual fade where the halves meet, got {darkening[0].round(2)}"

    # Overlay off: the image everywhere
    page.locator("#overlay").uncheck()
    assert_close(shot(card), data.image, "overlay off")

    # On again at 0.5
    page.locator("#overlay").check()
    set_range(page.locator("#opacity"), 0.5)
    pixels = shot(card)
    assert_close(pixels[HOT], blend(data.image[HOT], 0.5), "hot half at opacity 0.5")
    assert_close(pixels[COLD], data.image[COLD], "faded half at opacity 0.5")
    assert page.locator("#opacity-value").inner_text() == "50%"

    # Per card: this card at opacity 1, then off, leaves the other cards alone
    other = page.locator("figure.card").filter(has=page.locator("code.id", has_text=SCRIPT_ID))
    set_range(card.locator(".opacity"), 1.0)
    assert_close(shot(card)[HOT], blend(data.image[HOT], 1.0), "this card at opacity 1")
    assert_close(shot(other)[HOT], blend(data.image[HOT], 0.5), "the other card still at 0.5")
    card.locator(".show").uncheck()
    assert_close(shot(card), data.image, "this card's overlay off")
    assert_close(shot(other)[HOT], blend(data.image[HOT], 0.5), "the other card still on")

    # Captions: image id and locator under the card
    assert card.locator("code.id").inner_text() == IMAGE_ID
    assert card.locator("code.locator").inner_text() == data.locator
    # Nothing but local files was loaded, and nothing complained (CSP, scripts)
    assert opened.requests and all(url.startswith("file:///") for url in opened.requests), opened.requests
    assert opened.problems == []
    page.close()


def test_ids_are_shown_as_text_and_failed_maps_show_their_error(
    browser_context: Any, data: Data, tmp_path: Path
) -> None:
    html = write_gallery(tmp_path / "gallery.html", data.rows, data.images)
    assert SCRIPT_ID not in html.read_text()
    opened = open_page(browser_context, html)
    page = opened.page

    # The script-like id is text under its card, its image found in a subfolder named '<script>alert("x")<'
    card = page.locator("figure.card").filter(has=page.locator("code.id", has_text=SCRIPT_ID))
    assert card.locator("code.id").inner_text() == SCRIPT_ID
    assert card.locator("img.base").get_attribute("alt") == SCRIPT_ID
    assert page.locator("script").count() == 1  # the page's own
    assert_close(shot(card)[HOT], blend(data.image[HOT], float(page.locator("#opacity").input_value())), "")

    # The failed map: its image, its error, no overlay
    failed = page.locator("figure.card").filter(has=page.locator("code.id", has_text=FAILED_ID))
    assert failed.locator(".error").inner_text() == "InvalidMapError: map has NaN"
    assert failed.locator("img.map").count() == 0
    assert failed.locator("img.base").count() == 1
    assert page.locator(".summary").inner_text() == "3 maps, 1 failed"
    assert opened.problems == []
    page.close()


def test_s3_locators_become_presigned_https_urls_without_contacting_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in [n for n in os.environ if n.startswith(("ACTMAP_", "AWS_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAGALLERYTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network used: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)

    locator = "s3://actmap-bucket/maps/val/img 1.png"
    row = MapResult(
        image_id=IMAGE_ID, name="cat", locator=locator, bitmap_mask=bitmap_mask(locator)
    ).to_dict()
    html = render_gallery([row], image_lookup(tmp_path), s3_presigner())

    src = unescape(html.split('<img class="map alone" src="', 1)[1].split('"', 1)[0])
    url = urlsplit(src)
    query = parse_qs(url.query)
    assert url.scheme == "https"
    assert "actmap-bucket" in url.netloc + url.path
    assert url.path.endswith("/maps/val/img%201.png")
    assert query["X-Amz-Credential"][0].startswith("AKIAGALLERYTEST/")
    assert "/eu-west-1/s3/" in query["X-Amz-Credential"][0]
    assert query["X-Amz-Expires"] == ["604800"]
    assert len(query["X-Amz-Signature"][0]) == 64
    assert f'<code class="locator">{locator}</code>' in html  # the locator, not the URL, is the caption
    assert f"{IMAGE_ID} · cat" in unescape(html)

    # An S3-compatible endpoint from the settings is presigned against
    monkeypatch.setenv("ACTMAP_S3_ENDPOINT_URL", "http://minio.internal:9000")
    html = render_gallery([row], image_lookup(tmp_path))
    assert 'src="http://minio.internal:9000/actmap-bucket/maps/val/img%201.png?' in html


def test_cli_gallery_writes_the_page(data: Data, tmp_path: Path) -> None:
    out = tmp_path / "site" / "gallery.html"
    command = [sys.executable, "-m", "worker.cli", "gallery", "--results", str(data.results)]
    done = subprocess.run(
        [*command, "--images", str(data.images), "--out", str(out)],
        env=clean_env({}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    page = out.read_text(encoding="utf-8")
    assert page.count('<figure class="card"') == 3
    assert (data.images / f"{IMAGE_ID}.png").resolve().as_uri() in page
    assert data.locator in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(links) == 5 and all(link.startswith("file:///") for link in links), links  # no CDN, no network

    data.results.write_text("not json\n")
    bad = subprocess.run(
        [*command, "--images", str(data.images), "--out", str(out)],
        env=clean_env({}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "cannot read" in bad.stderr


def test_actmap_demo_ends_with_a_gallery_of_its_maps(browser_context: Any, tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--count", "2", "--size", "64"],
        env=clean_env({"ACTMAP_HOME": str(home)}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    gallery = home / "demo" / "gallery.html"
    assert f"gallery:  {gallery} (open it in a browser)" in done.stdout
    opened = open_page(browser_context, gallery)  # waits until every image and map has loaded
    page = opened.page
    assert page.locator("code.id").all_inner_texts() == ["demo-000", "demo-001"]
    assert page.locator("img.base").count() == 2
    assert page.locator("img.map").count() == 2
    assert opened.problems == []
    page.close()


def test_no_image_in_the_folder_shows_the_map_alone_and_odd_locators_are_not_links(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    png = tmp_path / "passwd.png"  # beside the images folder: '..' in an id must not reach it
    png.write_bytes(render_png(half_hot_map()))
    row = MapResult(image_id="../passwd", name=None, locator=png.as_uri()).to_dict()
    html = render_gallery([row], image_lookup(tmp_path / "images"))
    assert '<img class="map alone"' in html
    assert "no image for this id" in html
    html = render_gallery([{**row, "locator": "javascript:alert(1)"}], image_lookup(tmp_path / "images"))
    assert "<img" not in html
    assert "map not shown: ValueError: unsupported locator" in html
