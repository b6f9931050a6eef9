"""``python -m spndi_dask.cli``: the ``spndi`` command."""

import sys

from spndi_dask.cli import main

sys.exit(main())
