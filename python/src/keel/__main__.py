"""``keel`` and ``python -m keel``: signal handling first, then the CLI.

The ``keel`` command's entry point is :func:`run`. It installs keel's SIGINT
and SIGTERM handling (:mod:`keel.signals`) before importing the CLI, so a
signal during start-up ends the command quietly instead of printing a
``KeyboardInterrupt`` traceback from an import.
"""

import sys

from keel import signals


def run() -> None:
    signals.install()
    try:
        from keel.cli import main

        code = main()
        signals.finished()  # inside the try: no moment is left for a traceback
    except KeyboardInterrupt as exc:
        signals.finished()
        code = exc.exit_code if isinstance(exc, signals.Interrupted) else 130
    sys.exit(code)


if __name__ == "__main__":
    run()
