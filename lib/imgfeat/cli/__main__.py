"""``python -m imgfeat.cli``: the ``imgfeat`` command."""

import sys

from imgfeat.cli import main

sys.exit(main())
