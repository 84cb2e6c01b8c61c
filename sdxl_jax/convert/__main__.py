"""`python -m sdxl_jax.convert SRC DST [--to jax|diffusers|single-file] ...`: see `sdxl_jax.convert.cli`."""

import sys

from sdxl_jax.convert.cli import main

sys.exit(main())
