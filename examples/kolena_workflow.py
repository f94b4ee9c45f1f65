"""Kolena's activation-map tutorial, Step 3 ("run inference"), with actmap doing the rendering.

The tutorial colorizes, PNG-encodes and uploads each map inside ``infer``, so the GPU waits.
Here ``infer`` only submits the map; the inferences are assembled once the workers are done:

    actmap worker &                    # or any number of workers on other hosts
    python examples/kolena_workflow.py --count 8

With no ACTMAP_* settings this runs on the embedded default (one machine, no server). The
last step, handing the inferences to Kolena, needs a Kolena account and is left as a comment.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from kolena.workflow import Image
from kolena.workflow import Inference as BaseInference
from kolena.workflow.annotation import BitmapMask

from producer import Producer
from producer.kolena import fill_activation_maps


@dataclass(frozen=True)
class TestSample(Image):  # the tutorial's test sample: an image by locator
    pass


@dataclass(frozen=True)
class Inference(BaseInference):  # the tutorial's inference, with its activation map
    label: str
    confidence: float
    activation_map: BitmapMask | None = None


def model(test_sample: TestSample, rng: np.random.Generator) -> tuple[str, float, np.ndarray]:
    """Stands in for the GPU model: a label, a confidence and a Grad-CAM-like map in [0, 1]."""
    yy, xx = np.mgrid[0:224, 0:224] / 224
    cy, cx = rng.uniform(0.25, 0.75, 2)
    cam = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02).astype(np.float32)
    return "cat", float(rng.uniform(0.5, 1.0)), cam


def image_id(test_sample: TestSample) -> str:
    """The image id actmap keys the map by: here, the image's file name without its suffix."""
    return test_sample.locator.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    test_samples = [TestSample(locator=f"s3://my-images/val/img-{i:03d}.jpg") for i in range(args.count)]

    with Producer() as producer:
        # The inference loop: submit returns at once; the GPU goes on with the next image.
        inferences = []
        for test_sample in test_samples:
            label, confidence, cam = model(test_sample, rng)
            producer.submit(image_id(test_sample), cam)
            inferences.append(Inference(label=label, confidence=confidence))
        # Assembly: collect every map's result, then fill the inferences' activation_map.
        image_ids = [image_id(test_sample) for test_sample in test_samples]
        results = producer.collect(image_ids, timeout=300)
    inferences = fill_activation_maps(inferences, image_ids, results)

    for test_sample, inference in zip(test_samples, inferences, strict=True):
        assert inference.activation_map is not None
        print(
            f"{test_sample.locator} -> {inference.label} {inference.confidence:.2f} "
            f"{inference.activation_map.locator}"
        )
    # With a Kolena account, hand them over as the tutorial does, e.g.:
    #   from kolena.workflow import test
    #   test(model_with_these_inferences, test_suite)


if __name__ == "__main__":
    main()
