"""spark-submit jobs/train_heads.py ... : same flags as `imgfeat train` (see `imgfeat train --help`)."""

import sys

from _bootstrap import ensure_imgfeat

ensure_imgfeat()

from imgfeat.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
