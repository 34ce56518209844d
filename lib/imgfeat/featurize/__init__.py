"""Featurizing on Spark: the pandas UDF (``udf``), the ML Transformer (``transformer``) and the extract job (``extract``)."""
