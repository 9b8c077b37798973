"""``python -m fused_flat``: the command line (info, bench); see fused_flat.cli."""
import sys

from fused_flat.cli import main

sys.exit(main())
