"""spark-submit jobs/extract_features.py --input DIR --output PATH [--model NAME] [--weights ...] ...

Image folder -> features table + errors table. Same flags as `imgfeat extract`.
"""

import sys

from _bootstrap import ensure_imgfeat

ensure_imgfeat()

from imgfeat.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
