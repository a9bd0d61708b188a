"""Error types; every message names the problem and the fix."""


class DeepportError(Exception):
    """Base error: the CLI prints its message on one line and exits with code 2."""


class BackendError(DeepportError):
    """Unknown, unavailable or misbehaving backend, or a dtype it lacks."""


class ContractError(DeepportError):
    """An op implementation does not match its contract, or inputs break a precondition."""


class CheckpointError(DeepportError):
    """A checkpoint is missing, corrupt, or does not match the config."""


class ConfigError(DeepportError):
    """A config value deepport cannot honour."""
