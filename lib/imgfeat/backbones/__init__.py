"""Backbones: the registry of frozen feature extractors by name (``registry``) and where their weights come from (``weights``)."""
