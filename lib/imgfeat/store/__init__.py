"""Tables: features, errors and predictions in Parquet or Delta, incremental appends and repair (``tables``)."""
