"""Scoring new images with a trained model: batch prediction on Spark (``batch``)."""
