"""`python -m dsire` is the `dsire` command."""

import sys

from dsire.cli import main

sys.exit(main())
