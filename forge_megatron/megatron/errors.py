"""Configuration errors: one clear line on rank 0, naming the flag to change, and exit status 2."""

from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import contextmanager

RANK_0_GRACE_S = 10.0  # the other ranks' wait; rank 0 exits long before, and torchrun then stops them


class ConfigurationError(ValueError):
    """A flag combination FORGE (or Megatron) cannot honour; the message names the fix."""


@contextmanager
def exit_on_configuration_error(validating: bool = False, prog: str = "forge-pretrain-gpt"):
    """Turn a ConfigurationError into one line on rank 0 (every rank exits with status 2, none
    prints a traceback); while `validating` the arguments, so is a failed assertion of Megatron's
    argument validation."""
    caught = (ConfigurationError, AssertionError) if validating else ConfigurationError
    try:
        yield
    except caught as error:
        if int(os.environ.get("RANK", "0")) == 0:
            message = str(error).strip().splitlines()[0] if str(error).strip() else _where(error)
            sys.stderr.write(f"{prog}: error: {message}\n")  # one write: ranks share the stream
            sys.stderr.flush()
        else:  # torchrun stops every rank when one exits: leave rank 0 the time to print first
            time.sleep(RANK_0_GRACE_S)
        raise SystemExit(2) from None


def _where(error: BaseException) -> str:
    """A message-less assertion, named by where it failed."""
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__} at {frame.filename}:{frame.lineno}: {frame.line}"
