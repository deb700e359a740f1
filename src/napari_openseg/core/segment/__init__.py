"""Segmentation by example: slice-by-slice inference, ensembles, object extent."""
