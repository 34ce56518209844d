"""The pyfunc flavour's entry file ("models from code"): MLflow runs it to build the model, so nothing is unpickled."""

import mlflow

from imgfeat.scoring.pyfunc import ImgfeatPyfunc

mlflow.models.set_model(ImgfeatPyfunc())
