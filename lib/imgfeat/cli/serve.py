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
    p.add_argument("--token", help=f"bearer token required on POST requests (default ${TOKEN_ENV}; an empty one is refused)")
    p.add_argument("--allow-anonymous", action="store_true", help="bind a non-loopback address without a token")
    p.add_argument("--max-upload-mb", type=float, help="largest upload accepted (default 50)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {"serve.model_uri": a.model_uri, "serve.host": a.host, "serve.port": a.port,
            "serve.max_upload_mb": a.max_upload_mb, "mlflow.tracking_uri": a.tracking_uri}


def token_from(a: argparse.Namespace) -> str | None:
    """--token, else $IMGFEAT_SERVE_TOKEN, else None; an empty or blank one (either way) is a ValueError."""
    from imgfeat.serve.app import check_token

    return check_token(a.token if a.token is not None else os.environ.get(TOKEN_ENV))


def run(a: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    from imgfeat.serve.app import Limits, serve
    from imgfeat.serve.models import open_classifier

    if not cfg.serve.model_uri:
        raise ValueError("--model-uri is required: a child run of `imgfeat train` (runs:/RUN_ID) or models:/NAME/VERSION")
    token = token_from(a)  # before the model loads: a wrong start fails at once
    s = cfg.serve
    limits = Limits(max_upload_bytes=int(s.max_upload_mb * 1024 * 1024), max_waiting=s.max_waiting,
                    max_images=s.max_images, request_timeout_s=s.request_timeout_s, body_timeout_s=s.body_timeout_s)
    classifier, uri = open_classifier(cfg)
    print(f"[imgfeat] serve {s.model_uri} -> {uri}: {classifier.describe()}", flush=True)
    print(f"[imgfeat]   page: http://{s.host}:{s.port}/   API: POST /predict   schema: /docs", flush=True)
    serve(classifier, host=s.host, port=s.port, model_uri=uri, token=token, allow_anonymous=a.allow_anonymous,
          limits=limits, limit_concurrency=s.limit_concurrency, keep_alive_s=s.keep_alive_s)
    return {"model_uri": uri}
