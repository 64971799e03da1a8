"""scikit-learn's 8x8 digits as float32 [n, 64] in [-1, 1], a fixed split and a thickness label.

Pixels are integers 0..16; x = pixel / 8 - 1. The "stroke thickness" of an image is its ink mass
sum_j (x_j + 1) / 2 against the median ink mass of its class on the training split: thick (1)
above, thin (0) at or below. It is the second attribute of the product-of-experts demo.
Nothing is downloaded: sklearn ships the 1797 images.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

DIM = 64
NUM_CLASSES = 10
TEST_FRACTION = 0.25
SPLIT_SEED = 0


class Split(NamedTuple):
    """x float32 [n, 64] in [-1, 1]; label int32 [n] in 0..9; thick int32 [n] in {0, 1}."""

    x: np.ndarray
    label: np.ndarray
    thick: np.ndarray


class Digits(NamedTuple):
    """The fixed train/test split and the per-class median ink mass (training split) [10]."""

    train: Split
    test: Split
    median_ink: np.ndarray


def scale(pixels: np.ndarray) -> np.ndarray:
    """Pixels 0..16 -> pixel / 8 - 1 in [-1, 1], float32."""
    return (np.asarray(pixels, np.float32) / 8.0 - 1.0).astype(np.float32)


def ink(x) -> np.ndarray:
    """Ink mass sum_j (x_j + 1) / 2 of images x [..., 64] in [-1, 1] (pixels clipped), [...]."""
    x = np.clip(np.asarray(x, np.float64), -1.0, 1.0)
    return np.sum((x + 1.0) / 2.0, axis=-1)


def thickness(x, label, median_ink: np.ndarray) -> np.ndarray:
    """1 where ink(x) exceeds the median ink of the image's class `label`, else 0; int32 [...]."""
    return (ink(x) > np.asarray(median_ink)[np.asarray(label)]).astype(np.int32)


@functools.lru_cache(maxsize=1)
def load() -> Digits:
    """The 1797 digits, split 75/25 stratified by class with a fixed seed (same on every call)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x, label = scale(raw.data), raw.target.astype(np.int32)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(label), bool)
    for c in range(NUM_CLASSES):  # stratified: the same test fraction of every class
        members = np.flatnonzero(label == c)
        test[rng.choice(members, round(TEST_FRACTION * len(members)), replace=False)] = True
    median = np.array([np.median(ink(x[~test & (label == c)])) for c in range(NUM_CLASSES)])

    def split(mask):
        return Split(x[mask], label[mask], thickness(x[mask], label[mask], median))

    return Digits(split(~test), split(test), median)
