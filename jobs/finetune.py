"""spark-submit jobs/finetune.py ... : same flags as `imgfeat finetune` (see `imgfeat finetune --help`)."""

import sys

from _bootstrap import ensure_imgfeat

ensure_imgfeat()

from imgfeat.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
