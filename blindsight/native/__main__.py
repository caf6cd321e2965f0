import sys

from blindsight.native.cli import main

sys.exit(main())
