"""``python -m deep_ep_ops.bench``."""

import sys

from .cli import main

sys.exit(main())
