"""The trained model without Spark: heads as arrays, the image classifier, its explanations, the MLflow pyfunc."""
