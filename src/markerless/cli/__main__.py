"""`python -m markerless.cli`: the same as the `markerless` console script."""

import sys

from markerless.cli import main

sys.exit(main())
