"""Inference engines: build a backbone once per Python worker and run it on image batches (one module per framework)."""
