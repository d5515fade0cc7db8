"""``python -m flare_async``: the same as the ``flare-async`` command."""

import sys

from flare_async.cli import main

sys.exit(main())
