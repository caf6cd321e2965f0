"""``python -m blindsight.serve OUT_DIR ...``: bs-serve, through the same guard as the console script."""

import sys

from blindsight.entry import bs_serve

sys.exit(bs_serve())
