"""The one error the converters raise for a model, checkpoint or flag they cannot convert: the
message says why and what to do. It is a ValueError, so that the config and weight mapping stay
importable without Megatron; the console entry points turn it into one line and exit status 2,
as forge-pretrain-gpt does with its configuration errors."""

from __future__ import annotations

from contextlib import contextmanager


class ConversionError(ValueError):
    pass


@contextmanager
def exit_on_conversion_error(prog: str):
    from forge_megatron.megatron.errors import ConfigurationError, exit_on_configuration_error

    with exit_on_configuration_error(prog=prog):
        try:
            yield
        except ConversionError as error:
            raise ConfigurationError(str(error)) from None
