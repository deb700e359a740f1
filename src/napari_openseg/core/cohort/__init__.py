"""Cohorts: one task over many files, resumable, locally or on Dask."""
