"""Grad-CAM in a PyTorch inference loop: Kolena's inline rendering against actmap's submit.

A small CNN (random, seeded weights: three conv layers, global average pooling, a 10-class
linear head) runs over a folder of images (JPEG/PNG, resized to --size; a few synthetic ones
if no folder is given). Grad-CAM on its last conv layer gives one map per image, which leaves
the loop in one of two ways, both timed in this run:

  (1) inline, as Kolena's tutorial does: colorize_activation_map + encode_png + write the PNG
      to a local folder (standing in for the upload), inside the loop;
  (2) actmap: producer.submit(image_id, cam) inside the loop, producer.collect(...) after it.

Kolena's colorizer takes about 1.5-1.8 s per 224x224 map, so the inline path runs on the first
2 images only (--inline-count; --no-inline skips it). On the embedded default (one machine,
no server; run both from the same folder, or set ACTMAP_HOME for both):

    actmap worker &
    python examples/gradcam_producer.py [--images DIR] [--count 8] [--size 224]

Needs torch (CPU is enough; nothing is downloaded) and, for the inline path, kolena.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from producer import CollectTimeoutError, Producer

NUM_CLASSES = 10
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class SmallCNN(torch.nn.Module):
    """Three conv layers, global average pooling, a linear head; ``last_conv`` is Grad-CAM's layer."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.ReLU(),
        )
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.head = torch.nn.Linear(64, num_classes)

    @property
    def last_conv(self) -> torch.nn.Module:
        return self.features[6]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.pool(self.features(x)).flatten(1))
        return logits


def make_model(seed: int = 0) -> SmallCNN:
    """The example's model: random weights, the same for the same seed; eval mode."""
    torch.manual_seed(seed)
    return SmallCNN().eval()


class GradCAM:
    """Grad-CAM (Selvaraju et al.) on one layer of a model, through hooks.

    A forward hook keeps the layer's activations A and puts a hook on them that keeps their
    gradient. Calling this runs the model, back-propagates the top class's score (or
    ``target``'s), weights each channel k by its spatially averaged gradient w_k, and returns
    ReLU(sum_k w_k A_k) upsampled bilinearly to the input's size and scaled to [0, 1] per image
    (all zeros where it is zero everywhere), as float32 (B, H, W), with the classes explained.
    """

    def __init__(self, model: torch.nn.Module, layer: torch.nn.Module) -> None:
        self.model = model
        self._activations: torch.Tensor | None = None
        self._gradients: torch.Tensor | None = None
        self._handle = layer.register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._activations = output
        if output.requires_grad:
            output.register_hook(self._keep_gradient)

    def _keep_gradient(self, grad: torch.Tensor) -> None:
        self._gradients = grad

    def __call__(self, images: torch.Tensor, target: int | None = None) -> tuple[np.ndarray, list[int]]:
        if images.dim() == 3:
            images = images.unsqueeze(0)
        self._activations = self._gradients = None
        with torch.enable_grad():
            logits = self.model(images)
            if target is None:
                classes = logits.argmax(dim=1)
            else:
                classes = torch.full((logits.shape[0],), target, dtype=torch.long)
            # Each image's score depends on its own activations only, so one backward pass
            # gives every image's gradients.
            self.model.zero_grad(set_to_none=True)
            logits.gather(1, classes[:, None]).sum().backward()
        if self._activations is None or self._gradients is None:
            raise RuntimeError("the Grad-CAM layer was not run, or its output needs no gradient")
        with torch.no_grad():
            weights = self._gradients.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
            cam = torch.relu((weights * self._activations).sum(dim=1, keepdim=True))
            cam = torch.nn.functional.interpolate(
                cam, size=images.shape[-2:], mode="bilinear", align_corners=False
            )[:, 0]
            low = cam.amin(dim=(1, 2), keepdim=True)
            span = cam.amax(dim=(1, 2), keepdim=True) - low
            cam = torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))
            cam = cam.clamp_(0.0, 1.0)
        self.model.zero_grad(set_to_none=True)
        self._activations = self._gradients = None
        return cam.to(torch.float32).cpu().numpy(), classes.tolist()

    def close(self) -> None:
        self._handle.remove()


# -- images -------------------------------------------------------------------------


def folder_images(folder: Path, count: int) -> list[tuple[str, Path]]:
    """The first ``count`` JPEG/PNG files under ``folder``; image id = relative path without suffix."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    seen: dict[str, Path] = {}
    for path in files:
        image_id = path.relative_to(folder).with_suffix("").as_posix()
        if image_id in seen:
            sys.exit(f"{seen[image_id]} and {path} would have the same image id {image_id!r}")
        seen[image_id] = path
    return list(seen.items())[:count]


def load_image(path: Path, size: int) -> np.ndarray:
    """An image file as (size, size, 3) uint8 RGB."""
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants


def synthetic_image(index: int, size: int) -> np.ndarray:
    """A noisy background with a bright colored disk somewhere: (size, size, 3) uint8 RGB."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.25, 0.75, 2)
    disk = ((yy - cy) ** 2 + (xx - cx) ** 2) < rng.uniform(0.01, 0.04)
    image = rng.integers(0, 80, (size, size, 3)).astype(np.float64)
    image[disk] = rng.uniform(150, 255, 3)
    return image.astype(np.uint8)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 to a normalized (3, H, W) float tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).to(torch.float32) / 255
    return (tensor - _MEAN) / _STD


# -- the two loops ------------------------------------------------------------------


def inline_renderer(out_dir: Path) -> Callable[[str, np.ndarray], None]:
    """Kolena's tutorial, inside the loop: colorize, encode, 'upload' (write to ``out_dir``)."""
    from kolena.workflow.visualization import colorize_activation_map, encode_png

    def render(image_id: str, cam: np.ndarray) -> None:
        png = encode_png(colorize_activation_map(cam), mode="RGBA")
        path = out_dir / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png.getvalue())

    return render


def run_loop(
    grad_cam: GradCAM,
    images: list[tuple[str, torch.Tensor]],
    handle: Callable[[str, np.ndarray], object],
) -> tuple[list[float], list[float]]:
    """The inference loop: Grad-CAM, then ``handle`` the map. Seconds per image for each part."""
    cam_s, handle_s = [], []
    for image_id, tensor in images:
        start = time.perf_counter()
        cams, _ = grad_cam(tensor)
        middle = time.perf_counter()
        handle(image_id, cams[0])
        end = time.perf_counter()
        cam_s.append(middle - start)
        handle_s.append(end - middle)
    return cam_s, handle_s


def ms(seconds: list[float]) -> float:
    return 1000 * sum(seconds) / len(seconds)


def print_table(
    cam_s: list[float],
    inline: tuple[list[float], list[float]] | None,
    submit: tuple[list[float], list[float]],
) -> None:
    rows: list[tuple[str, int, str, str]] = [("model + Grad-CAM alone", len(cam_s), f"{ms(cam_s):.2f}", "")]
    if inline is not None:
        rows.append(
            (
                "(1) inline extra",
                len(inline[1]),
                f"{ms(inline[1]):.2f}",
                "colorize_activation_map + encode_png + write PNG",
            )
        )
    rows.append(("(2) actmap submit extra", len(submit[1]), f"{ms(submit[1]):.3f}", "producer.submit"))
    if inline is not None:
        rows.append(("loop, inline", len(inline[0]), f"{ms(inline[0]) + ms(inline[1]):.2f}", "(1) per image"))
    rows.append(("loop, actmap", len(submit[0]), f"{ms(submit[0]) + ms(submit[1]):.2f}", "(2) per image"))
    print(f"{'ms per image':<26}{'images':>7}{'ms':>11}  what")
    for label, n, value, what in rows:
        print(f"{label:<26}{n:>7}{value:>11}  {what}")
    if inline is not None:
        extra_ratio = ms(inline[1]) / max(ms(submit[1]), 1e-9)
        loop_ratio = (ms(inline[0]) + ms(inline[1])) / (ms(submit[0]) + ms(submit[1]))
        print(f"ratio inline/actmap: extra cost {extra_ratio:,.0f}x, whole loop {loop_ratio:,.1f}x")
    else:
        print("inline path skipped (--no-inline)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, help="folder of JPEG/PNG images (default: synthetic ones)")
    parser.add_argument("--count", type=int, default=8, help="images to process (default 8)")
    parser.add_argument(
        "--size", type=int, default=224, help="images are resized to size x size (default 224)"
    )
    parser.add_argument("--inline-count", type=int, default=2, help="images for the inline path (default 2)")
    parser.add_argument("--no-inline", action="store_true", help="skip the inline (Kolena) path")
    parser.add_argument(
        "--inline-dir", type=Path, help="where the inline path writes (default: a temp folder)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's random weights")
    parser.add_argument("--timeout", type=float, default=600, help="seconds collect waits for the workers")
    args = parser.parse_args()
    if args.count < 1 or args.size < 8 or args.inline_count < 0:
        parser.error("expected --count >= 1, --size >= 8, --inline-count >= 0")

    if args.images is None:
        rgbs = [(f"synthetic-{i:03d}", synthetic_image(i, args.size)) for i in range(args.count)]
    else:
        if not args.images.is_dir():
            parser.error(f"--images {args.images}: not a folder")
        paths = folder_images(args.images, args.count)
        if not paths:
            parser.error(f"--images {args.images}: no {'/'.join(IMAGE_SUFFIXES)} files")
        rgbs = [(image_id, load_image(path, args.size)) for image_id, path in paths]
    images = [(image_id, to_tensor(rgb)) for image_id, rgb in rgbs]

    model = make_model(args.seed)
    grad_cam = GradCAM(model, model.last_conv)
    grad_cam(torch.zeros(3, args.size, args.size))  # warm-up: the first call pays one-off costs

    inline = None
    inline_count = 0 if args.no_inline else min(args.inline_count, len(images))
    if inline_count:
        print(
            f"inline path on {inline_count} of {len(images)} images: Kolena's colorize_activation_map "
            f"takes ~1.5 s per 224x224 map (--inline-count N to change, --no-inline to skip)",
            file=sys.stderr,
        )
        with tempfile.TemporaryDirectory(prefix="gradcam-inline-") as temp:
            out_dir = args.inline_dir or Path(temp)
            inline = run_loop(grad_cam, images[:inline_count], inline_renderer(out_dir))

    with Producer() as producer:
        pending: list[Any] = []
        submit = run_loop(
            grad_cam, images, lambda image_id, cam: pending.append(producer.submit(image_id, cam))
        )
        grad_cam.close()
        print(f"collecting {len(pending)} maps (needs a running `actmap worker`)...", file=sys.stderr)
        start = time.perf_counter()
        try:
            results = producer.collect(pending, timeout=args.timeout)
        except CollectTimeoutError as exc:
            sys.exit(f"{exc}: is an `actmap worker` running, with the same settings (ACTMAP_HOME)?")
        collect_s = time.perf_counter() - start

    print_table(submit[0] + (inline[0] if inline else []), inline, submit)
    print(f"collect after the loop: {collect_s:.2f} s for {len(results)} maps (workers, off the loop)")
    print()
    failed = 0
    for result in results:
        if result.ok:
            print(f"{result.image_id} {result.locator}")
        else:
            failed += 1
            print(f"{result.image_id} FAILED {result.error}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
