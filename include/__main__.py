from __future__ import annotations

import sys

from include.cli import main

sys.exit(main())
