"""Configuration errors: one clear line on rank 0, naming the flag to change, and exit status 2."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


class ConfigurationError(ValueError):
    """A flag combination FORGE (or Megatron) cannot honour; the message names the fix."""


@contextmanager
def exit_on_configuration_error(prog: str = "forge-pretrain-gpt"):
    """Turn a ConfigurationError, or one of the assertions Megatron's argument validation makes,
    into one line on rank 0 (every rank exits with status 2, none prints a traceback)."""
    try:
        yield
    except (ConfigurationError, AssertionError) as error:
        if int(os.environ.get("RANK", "0")) == 0:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
