"""Scoring samples: feature extractors and the evaluation classifier, where the images come
from, FID / KID / IS against a reference, and speed-against-quality sweeps.
"""
