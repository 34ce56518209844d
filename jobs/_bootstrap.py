"""Make ``imgfeat`` importable when a job runs from a clone where the package is not installed."""

import os
import sys

LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib")


def ensure_imgfeat() -> None:
    try:
        import imgfeat  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.abspath(LIB))
        # Local Python workers inherit the environment: let them import it too.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(LIB), os.environ.get("PYTHONPATH")]))
