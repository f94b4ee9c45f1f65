"""``actmap gallery``: one static HTML page showing each image with its activation map over it.

The page needs no server and no network of its own: no CDN, one inline stylesheet and one inline
script (the only script its Content-Security-Policy allows). Each map's PNG keeps its own size
(7x7 ... 224x224) and is stretched over its image by CSS with smooth interpolation, as Kolena
Studio shows a ``BitmapMask``. Images and ``file://`` maps are referenced by ``file://`` URL, so the
page works opened from disk on the machine that has the files; ``s3://`` maps are referenced by
presigned HTTPS URLs (presigning is computed locally and contacts nothing). Every text that comes
from results or ids is escaped.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PRESIGN_EXPIRES_S = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live
DEFAULT_OPACITY = 0.6

ImageLookup = Callable[[str], str | None]  # image id -> URL of the image, or None if not found
Presigner = Callable[[str], str]  # s3://bucket/key -> presigned HTTPS URL

_STYLE = """
:root { font-family: system-ui, sans-serif; color: #222; background: #f4f4f4; }
body { margin: 0 1rem 1rem; }
header { position: sticky; top: 0; z-index: 1; background: #f4f4f4; padding: .6rem 0; display: flex;
  gap: 1.2rem; align-items: center; flex-wrap: wrap; border-bottom: 1px solid #ccc; }
h1 { font-size: 1.1rem; margin: 0; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 1rem;
  padding-top: 1rem; }
.card { margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: .5rem; }
.stage { position: relative; display: inline-block; max-width: 100%; vertical-align: top; }
.base { display: block; max-width: 100%; height: auto; }
.map { position: absolute; inset: 0; width: 100%; height: 100%; image-rendering: auto;
  opacity: var(--card-opacity); pointer-events: none; }
.map.alone { position: static; display: block; width: 224px; height: auto; }
.off .map { visibility: hidden; }
.controls { display: flex; gap: .6rem; align-items: center; font-size: .8rem; margin: .3rem 0; }
.controls label { white-space: nowrap; }
figcaption { font-size: .8rem; overflow-wrap: anywhere; }
figcaption code { display: block; }
.locator { color: #555; }
.error, .note { color: #a00; font-size: .8rem; margin: .3rem 0; overflow-wrap: anywhere; }
""".strip()

# Global controls set every card's; each card's controls then adjust that card alone.
_SCRIPT = """
const cards = Array.from(document.querySelectorAll(".card"));
const show = document.getElementById("overlay"), opacity = document.getElementById("opacity");
function apply(card) {
  const own = card.querySelector(".opacity"), on = card.querySelector(".show");
  if (!own) return;
  card.style.setProperty("--card-opacity", own.value);
  card.classList.toggle("off", !on.checked);
  card.querySelector(".value").textContent = Math.round(own.value * 100) + "%";
}
function applyGlobal() {
  document.getElementById("opacity-value").textContent = Math.round(opacity.value * 100) + "%";
  for (const card of cards) {
    const own = card.querySelector(".opacity"), on = card.querySelector(".show");
    if (!own) continue;
    own.value = opacity.value;
    on.checked = show.checked;
    apply(card);
  }
}
show.addEventListener("change", applyGlobal);
opacity.addEventListener("input", applyGlobal);
for (const card of cards) {
  card.addEventListener("input", () => apply(card));
  card.addEventListener("change", () => apply(card));
}
applyGlobal();
"""


def find_image(images: Path, image_id: str) -> Path | None:
    """The file ``images/<image_id><suffix>`` for the first of IMAGE_SUFFIXES that exists (any case)."""
    root = images.expanduser().resolve()
    for suffix in IMAGE_SUFFIXES:
        for candidate in (root / f"{image_id}{suffix}", root / f"{image_id}{suffix.upper()}"):
            path = candidate.resolve()
            if path.is_relative_to(root) and path.is_file():  # an id with '..' finds nothing outside
                return path
    return None


def image_lookup(images: Path) -> ImageLookup:
    """Image ids to ``file://`` URLs of the images found in the folder ``images``."""

    def lookup(image_id: str) -> str | None:
        path = find_image(images, image_id)
        return None if path is None else path.as_uri()

    return lookup


def s3_presigner(settings: Settings | None = None, expires_s: int = PRESIGN_EXPIRES_S) -> Presigner:
    """Presign GETs of ``s3://bucket/key`` locators with actmap's S3 client, made on first use."""
    client: S3Client | None = None

    def presign(locator: str) -> str:
        nonlocal client
        bucket, _, key = locator.removeprefix("s3://").partition("/")
        if client is None:
            from worker.storage import make_s3_client

            client = make_s3_client(settings or Settings())
        return client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
        )

    return presign


def map_url(locator: str, presign: Presigner) -> str:
    """The URL a browser loads the map's PNG from; ValueError for a locator it cannot show."""
    if locator.startswith("s3://"):
        return presign(locator)
    if locator.startswith(("file:///", "file://localhost/", "https://", "http://")):
        return locator
    raise ValueError(f"unsupported locator {locator!r}; expected file://, s3:// or https://")


def render_gallery(
    results: Iterable[Mapping[str, Any]],
    image_url: ImageLookup,
    presign: Presigner | None = None,
    *,
    title: str = "actmap gallery",
    opacity: float = DEFAULT_OPACITY,
) -> str:
    """The HTML page for ``results`` (dicts as ``MapResult.to_dict`` gives, one per map)."""
    presign = presign or s3_presigner()
    rows = list(results)
    cards = "\n".join(_card(row, image_url, presign, opacity) for row in rows)
    failed = sum(not _ok(row) for row in rows)
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    csp = (
        f"default-src 'none'; img-src file: https: http: data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{script_hash}'"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{escape(csp)}">
<meta name="referrer" content="no-referrer">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>
{_STYLE}
</style>
</head>
<body>
<header>
<h1>{escape(title)}</h1>
<span class="summary">{len(rows)} maps, {failed} failed</span>
<label><input type="checkbox" id="overlay" checked> overlay</label>
<label>opacity <input type="range" id="opacity" min="0" max="1" step="0.05" value="{opacity}">
<span id="opacity-value">{round(opacity * 100)}%</span></label>
</header>
<main>
{cards}
</main>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_gallery(
    out: Path,
    results: Iterable[Mapping[str, Any]],
    images: Path,
    presign: Presigner | None = None,
    *,
    title: str = "actmap gallery",
) -> Path:
    """Render the gallery of ``results`` with images from the folder ``images`` into ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_gallery(results, image_lookup(images), presign, title=title), encoding="utf-8")
    return out


def read_results(path: Path) -> list[dict[str, Any]]:
    """The JSON lines ``actmap collect`` prints."""
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _ok(row: Mapping[str, Any]) -> bool:
    return bool(row.get("ok", row.get("error") is None))


def _card(row: Mapping[str, Any], image_url: ImageLookup, presign: Presigner, opacity: float) -> str:
    image_id = str(row.get("image_id", ""))
    name = row.get("name")
    locator = row.get("locator")
    label = image_id if name is None else f"{image_id} · {name}"
    image = image_url(image_id)
    overlay = note = ""
    if not _ok(row):
        error = row.get("error")
        text = f"{error.get('type')}: {error.get('message')}" if isinstance(error, Mapping) else str(error)
        note = f'<p class="error">{escape(text)}</p>'
    elif not locator:
        note = '<p class="note">no locator</p>'
    else:
        try:
            url = map_url(str(locator), presign)
        except Exception as exc:  # presigning without credentials, a locator of another scheme
            note = f'<p class="note">map not shown: {escape(type(exc).__name__)}: {escape(str(exc))}</p>'
        else:
            alone = "" if image else " alone"
            overlay = f'<img class="map{alone}" src="{escape(url)}" alt="activation map of {escape(label)}">'
    if image is None:
        suffixes = ", ".join(IMAGE_SUFFIXES)
        note += f'<p class="note">no image for this id ({suffixes}) in the images folder</p>'
    base = f'<img class="base" src="{escape(image)}" alt="{escape(label)}">' if image else ""
    controls = (
        '<div class="controls"><label><input type="checkbox" class="show" checked> overlay</label>'
        f'<input type="range" class="opacity" min="0" max="1" step="0.05" value="{opacity}"'
        f' aria-label="opacity"><span class="value">{round(opacity * 100)}%</span></div>'
        if overlay
        else ""
    )
    size = f"{row.get('width')}x{row.get('height')} map" if overlay and row.get("width") else ""
    return (
        f'<figure class="card" style="--card-opacity: {opacity}">\n'
        f'<div class="stage">{base}{overlay}</div>\n{controls}{note}\n'
        f'<figcaption><code class="id">{escape(label)}</code>'
        f'<code class="locator">{escape(str(locator or ""))}</code>{escape(size)}</figcaption>\n'
        "</figure>"
    )
