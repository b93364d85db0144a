"""`python -m gateway` is `canary-gateway`."""

import sys

from gateway.cli import main

sys.exit(main())
