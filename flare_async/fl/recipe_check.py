"""``python -m flare_async.fl.recipe_check MODULE:NAME``: exit 0 if it loads as a job's
recipe (see ``load_recipe``), else 2 with the reason on stderr. The server runs this in a
child process before it loads a submitted recipe itself."""

from __future__ import annotations

import sys

from flare_async.errors import ConfigError
from flare_async.fl._recipe import load_recipe


def main(argv: list[str]) -> int:
    try:
        load_recipe(argv[1])
    except ConfigError as exc:
        sys.stderr.write(f"ConfigError: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
