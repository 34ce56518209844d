"""Tables: features, errors and predictions in Parquet or Delta, incremental appends and repair (``tables``); where a
table's files and its runs' folders lie (``paths``); writer leases and the commit lock (``lease``); Delta commits
(``delta_commit``)."""
