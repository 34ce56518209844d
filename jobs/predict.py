"""spark-submit jobs/predict.py ... : same flags as `imgfeat predict` (see `imgfeat predict --help`)."""

import sys

from _bootstrap import ensure_imgfeat

ensure_imgfeat()

from imgfeat.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
