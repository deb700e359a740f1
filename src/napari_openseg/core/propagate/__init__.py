"""Prompt propagation: fronts, the self-sorting memory bank, confidence and stop rules."""
