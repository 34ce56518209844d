"""``imgfeat serve``: a trained model behind HTTP, with a page to try it (docs/serving.md)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from imgfeat.config import Config

HELP = "serve a trained model over HTTP with a web page (runs:/RUN_ID, models:/NAME/VERSION)"
TOKEN_ENV = "IMGFEAT_SERVE_TOKEN"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-uri", help="runs:/RUN_ID (a child run of train), models:/NAME/VERSION, or a pyfunc model URI")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; others need --token)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--token", help=f"bearer token required on POST requests (default ${TOKEN_ENV})")
    p.add_argument("--allow-anonymous", action="store_true", help="bind a non-loopback address without a token")
    p.add_argument("--max-upload-mb", type=float, help="largest upload accepted (default 50)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {"serve.model_uri": a.model_uri, "serve.host": a.host, "serve.port": a.port,
            "serve.max_upload_mb": a.max_upload_mb, "mlflow.tracking_uri": a.tracking_uri}


def run(a: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    from imgfeat.serve.app import serve
    from imgfeat.serve.models import open_classifier

    if not cfg.serve.model_uri:
        raise ValueError("--model-uri is required: a child run of `imgfeat train` (runs:/RUN_ID) or models:/NAME/VERSION")
    classifier, uri = open_classifier(cfg)
    print(f"[imgfeat] serve {cfg.serve.model_uri} -> {uri}: {classifier.describe()}", flush=True)
    print(f"[imgfeat]   page: http://{cfg.serve.host}:{cfg.serve.port}/   API: POST /predict   schema: /docs", flush=True)
    serve(classifier, host=cfg.serve.host, port=cfg.serve.port, model_uri=uri, token=a.token or os.environ.get(TOKEN_ENV),
          max_upload_bytes=int(cfg.serve.max_upload_mb * 1024 * 1024), allow_anonymous=a.allow_anonymous,
          max_waiting=cfg.serve.max_waiting)
    return {"model_uri": uri}
