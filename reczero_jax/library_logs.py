"""Other libraries' log messages (TFDS, absl and what logs through it: grain, Orbax) go to a
file in the output directory instead of the terminal, so a command shows our own progress
bars and summaries only.

    with library_logs_to(run_dir):  # appends to run_dir/libraries.log
        ...
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

LOG_FILE = "libraries.log"
# Logger -> the lowest level kept in the file. absl's carries TFDS's, grain's and Orbax's
# messages (Orbax logs dozens of INFO lines per checkpoint: warnings only); TFDS's own prints
# are logged to "tensorflow_datasets" at INFO by ``data.tfds_builder.prepare``.
LIBRARY_LOGGERS = {"absl": logging.WARNING, "tensorflow_datasets": logging.INFO}


@contextlib.contextmanager
def library_logs_to(directory: str | Path | None) -> Iterator[Path | None]:
    """Within the block, the messages of ``LIBRARY_LOGGERS`` (from their levels up) are appended to
    ``directory/libraries.log`` (created) and not passed on to the terminal's handlers; the
    loggers are restored after. ``None`` drops them (a process that writes no files). Yields
    the log file's path, or None."""
    path = None if directory is None else Path(directory) / LOG_FILE
    if path is None:
        handler = logging.NullHandler()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(logger.handlers, logger.propagate, logger.level) for logger in loggers]
    for logger, level in zip(loggers, LIBRARY_LOGGERS.values(), strict=True):
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(level)
    try:
        yield path
    finally:
        for logger, (handlers, propagate, level) in zip(loggers, saved, strict=True):
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        handler.close()
