"""`python -m medfl`: the `medfl` command, for environments where only the interpreter is on the PATH."""

import sys

from medfl.cli import main

sys.exit(main())
