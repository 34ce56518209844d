"""Drop-in replacements for other libraries' APIs (``sparkdl``), as thin shells over imgfeat's own stages."""
