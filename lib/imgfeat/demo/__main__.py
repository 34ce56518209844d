"""``python -m imgfeat.demo``: see ``imgfeat.demo.run``."""

import sys

from imgfeat.demo.run import main

sys.exit(main())
