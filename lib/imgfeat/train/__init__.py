"""Training on features: heads, metrics, MLflow tracking, the train job (``fit``) and the comparison of its runs."""
