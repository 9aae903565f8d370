"""Parts the pipelines (data, train, rl) share at run time, one concern per module."""
