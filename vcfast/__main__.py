"""``python -m vcfast``: the ``vcfast`` command (the console script's entry, vcfast.cli.main).

This is what ``torchrun ... -m vcfast train ...`` runs in each process.
"""

import sys

from vcfast.cli import main

if __name__ == "__main__":
    sys.exit(main())
