"""Where the package's log lines go when a user runs one of its programs.

The package logs through ``logging.getLogger("fedpac_hf...")`` and, as a
library, configures nothing. The programs a user runs (``fedpac-hf train``,
the scripts in ``examples/`` and the Flower ServerApp and ClientApp) call
:func:`show_package_log` so that its lines reach the console: that preflight
passed, how large the DP noise is next to the clip norm, a resume, a client
left out of a round. ``fedpac-hf train`` and the scripts print them on
standard error; the Flower apps hand them to Flower's console handler, so they
show wherever Flower shows its own lines (``flwr run --stream``, ``flwr log``).

Levels follow ``TrainingArguments``: ``log_level`` on the main process,
``log_level_replica`` on the others. ``log_level``'s default, ``"passive"``,
means INFO here (what Hugging Face's example scripts show by default);
``log_level: warning`` keeps only warnings and errors. The Trainer applies
the same settings to ``transformers``' own log.

Once a program shows the package's lines, they no longer propagate to the root
logger (as ``transformers`` does with its own): a library that configures the
root logger (Opacus calls ``logging.basicConfig`` when it is imported) would
otherwise print every line a second time, in its own format.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from fedpac_hf.config.arguments import FedPACArguments

__all__ = ["PACKAGE_LOGGER", "show_package_log"]

#: the logger every module of the package logs under
PACKAGE_LOGGER = "fedpac_hf"

_FORMAT = "[%(name)s] %(levelname)s: %(message)s"


class _ConsoleHandler(logging.StreamHandler):
    """A handler on the standard error stream of the moment it writes (so that a program
    which swaps ``sys.stderr``, as test capture does, still gets the lines)."""

    @property
    def stream(self) -> TextIO:
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ sets it: ignored
        pass


_STDERR = _ConsoleHandler()
_STDERR.setFormatter(logging.Formatter(_FORMAT))

#: the handler :func:`show_package_log` put on the package's logger (one at a time)
_added: list[logging.Handler] = []


def show_package_log(args: FedPACArguments, handler: logging.Handler | None = None) -> int:
    """Send the package's log records to the console, at the run's level.

    The package's lines go to one place at a time: calling it again changes
    the level and, with another ``handler``, moves them there; it never adds a
    second handler. The lines stop propagating to the root logger.

    Parameters
    ----------
    args : FedPACArguments
        The run's arguments: ``log_level`` (main process; ``"passive"``: INFO)
        and ``log_level_replica`` (the other processes) decide the level.
    handler : logging.Handler, optional
        Where the lines go, e.g. Flower's console handler
        (``flwr.common.logger.console_handler``) in a Flower app. Default:
        standard error, each line as ``[fedpac_hf.module] LEVEL: message``.

    Returns
    -------
    int
        The level set on the ``fedpac_hf`` logger.
    """
    level = args.get_process_log_level()
    if args.should_log and args.log_level == "passive":
        level = logging.INFO  # the main process's default here, as HF's example scripts
    logger = logging.getLogger(PACKAGE_LOGGER)
    handler = handler or _STDERR
    if handler not in logger.handlers:
        for old in _added:
            logger.removeHandler(old)
        _added[:] = [handler]
        logger.addHandler(handler)
    logger.propagate = False  # shown once, here, whatever handlers the root logger has
    logger.setLevel(level)
    return level
