"""Plain exception classes, importable without the compiled core."""


class FastwsError(Exception):
    """Base class of every error fastws raises on purpose."""


class ConfigError(FastwsError):
    """A configuration mistake: one line naming the file, the key and the problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")
