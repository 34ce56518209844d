"""imgfeat: folders of medical images -> frozen ImageNet CNN features on Spark -> heads in MLflow.

Importing this package is cheap: pyspark and tensorflow load only inside the functions that need them.
"""

__version__ = "0.1.0"
