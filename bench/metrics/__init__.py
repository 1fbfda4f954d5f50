"""Metrics that need a trained network of their own (FID/KID with the standard Inception-v3)."""
