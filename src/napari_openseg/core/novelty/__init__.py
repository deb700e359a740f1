"""Novelty maps: prototypes, scores, trained and training-free maps, intensity signatures."""
