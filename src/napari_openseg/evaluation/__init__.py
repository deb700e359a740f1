"""Evaluation of in-context segmentation weights against baselines on labelled folders."""
