"""``python -m fxqat ARGS`` (and ``torchrun --nproc_per_node=N -m fxqat qat ...``) is the ``fxqat`` command."""

import sys

from .cli import main

sys.exit(main())
