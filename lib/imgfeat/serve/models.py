"""Finding the served model: a user's URI -> the pyfunc model ``train`` logged -> its ``ImageClassifier``."""

from __future__ import annotations

from typing import Any

from imgfeat.config import Config


def open_classifier(cfg: Config) -> tuple[Any, str]:
    """(classifier, resolved pyfunc URI) for ``serve.model_uri``, with MLflow pointed at the configured store."""
    from mlflow.exceptions import MlflowException

    from imgfeat.scoring.pyfunc import load_classifier, resolve_uri
    from imgfeat.train.tracking import use_tracking

    store = use_tracking(cfg.mlflow)
    given = cfg.serve.model_uri or ""
    try:
        uri = resolve_uri(given)
        classifier = load_classifier(uri)
    except MlflowException as exc:
        raise ValueError(f"{given}: {exc.message.splitlines()[0]} (tracking store {store}). Models logged before imgfeat "
                         "had serving have no pyfunc_model: re-run `imgfeat train`.") from None
    classifier.threads = cfg.serve.threads
    return classifier, uri
