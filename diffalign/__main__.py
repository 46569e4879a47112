"""``python -m diffalign`` (and ``accelerate launch -m diffalign``) runs the command line."""

import sys

from diffalign.cli import main

sys.exit(main())
