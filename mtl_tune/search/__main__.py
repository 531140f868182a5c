import sys

from mtl_tune.search.cli import main

sys.exit(main())
