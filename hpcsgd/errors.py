"""Exception types hpcsgd raises for problems a user can fix.

Anything derived from :class:`HpcsgdError` is reported as one clean line on stderr and a
non-zero exit; any other exception is a bug and aborts the whole MPI job with a traceback.
"""


class HpcsgdError(Exception):
    """A problem with the user's input or environment, with a message that names it.

    Example::

        try:
            sampler = hpcsgd.RedundantSampler(train_set, world, q=world.size + 1)
        except hpcsgd.ConfigError as exc:  # raised on every rank alike
            sys.exit(f"bad setting: {exc}")
    """


class ConfigError(HpcsgdError, ValueError):
    """A config key or command-line flag is unknown, of the wrong type or out of range."""


class ShardError(HpcsgdError):
    """A shard directory is missing, corrupted or inconsistent with the job."""


class CheckpointError(HpcsgdError):
    """A checkpoint cannot be written or does not fit the run it is resumed into."""


class TrainingError(HpcsgdError):
    """Training cannot go on (for example a NaN loss with nan_policy = "stop")."""
