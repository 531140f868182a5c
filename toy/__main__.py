from .trajectories import main
import sys

sys.exit(main())
