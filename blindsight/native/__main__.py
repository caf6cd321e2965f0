import sys

from blindsight.native.build import main

sys.exit(main())
