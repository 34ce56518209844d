"""Input: listing files into DataFrames (``listing``) and decoding their bytes (``decoders``, one module per format)."""
