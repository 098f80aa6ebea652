"""Errors for bad dataset folders and bad shards; each message names the file, the value and what is valid."""


class DataError(ValueError):
    """A dataset folder, split, file or shard that cannot be used as it is."""


class ShardIntegrityError(DataError):
    """A shard whose bytes or row count differ from what its manifest recorded."""
