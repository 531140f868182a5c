import os
import sys

# before torch / scikit-learn load: a busy-waiting OpenMP runtime slows torch on small CPUs
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mtl_tune.search.cli import main  # noqa: E402

sys.exit(main())
