"""`python -m imagen_jax.cli`: the `imagen-jax` command."""

import sys

from imagen_jax.cli import main

sys.exit(main())
