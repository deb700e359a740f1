"""What the pixel classifier adds to each slice of a run, by slice size: CPU seconds on one thread.

Per slice a run that uses the classifier (``pixel-classifier``, ``stacked`` and ``auto``) computes
the filter features once (``pixel_features``) and, per task, the classifier's probability map
(``PixelClassifier.predict_map``: coarse to fine above 128 x 128). The classifier is the default
boosted one, fitted as the engine fits it (a balanced sample of the support pixels) to 16 slices
of a synthetic volume (``bench_segment.synthetic_volume``: smooth blobs, two labels, noise); the
stacked classifier's extra column, the network's probability, is stood in for by a smoothed copy
of the truth. Slices of another volume drawn the same way are then timed; the median over
``--slices`` slices is reported. What ``core/segment/expected_time.py`` adds per slice and task:

    python benchmarks/bench_classifier_slices.py --sizes 128 256 512 --slices 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench_segment import synthetic_volume


def time_size(size: int, slices: int) -> dict[str, float]:
    """Median CPU seconds per slice of the features and of one task's prediction, plain and stacked."""
    from scipy.ndimage import gaussian_filter
    from threadpoolctl import threadpool_limits

    from napari_openseg.core.pixel_classifier import PixelClassifier, pixel_features, sample_pixels
    from napari_openseg.core.preprocess import normalize_intensity

    def prepared(seed: int, count: int):
        image, labels = synthetic_volume(seed, count, size)
        images = [normalize_intensity(s) for s in image]
        truth = [s == 1 for s in labels]
        network = [gaussian_filter(t.astype(np.float32), 2.0) for t in truth]  # the stand-in
        return images, truth, network

    images, truth, network = prepared(2, 16)
    maps = [pixel_features(im) for im in images]
    rng = np.random.default_rng(0)
    picked = sample_pixels(truth, [None] * len(truth), rng)
    rows = np.concatenate([m.reshape(-1, m.shape[-1])[p] for m, p in zip(maps, picked)])
    extra = np.concatenate([n.reshape(-1)[p] for n, p in zip(network, picked)])
    labels = np.concatenate([t.reshape(-1)[p] for t, p in zip(truth, picked)])
    plain = PixelClassifier().fit(rows, labels)
    stacked = PixelClassifier().fit(np.column_stack([rows, extra]), labels)

    times: dict[str, list[float]] = {"features": [], "pixel-classifier": [], "stacked": []}
    queries, _, query_network = prepared(3, slices)
    with threadpool_limits(limits=1):
        for image, prob in zip(queries, query_network):
            start = time.process_time()
            features = pixel_features(image)
            times["features"].append(time.process_time() - start)
            start = time.process_time()
            plain.predict_map(features)
            times["pixel-classifier"].append(time.process_time() - start)
            start = time.process_time()
            stacked.predict_map(np.concatenate([features, prob[..., None]], axis=-1))
            times["stacked"].append(time.process_time() - start)
    return {key: float(np.median(values)) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--slices", type=int, default=8, help="query slices timed per size")
    args = parser.parse_args()
    print("| slice | features per slice (CPU s) | pixel classifier per task | stacked per task |")
    print("|---|---|---|---|")
    for size in args.sizes:
        row = time_size(size, args.slices)
        print(
            f"| {size} x {size} | {row['features']:.3f} | {row['pixel-classifier']:.3f} | "
            f"{row['stacked']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
