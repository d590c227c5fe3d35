"""Configuration-time errors of the registry: each names the problem and the fix."""


class RegistryError(Exception):
    pass


class InvalidEnvId(RegistryError, ValueError):
    pass


class EnvNotFound(RegistryError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DuplicateEnv(RegistryError, ValueError):
    pass


class EntryPointError(RegistryError, ImportError):
    pass


class NotAnEnv(RegistryError, TypeError):
    pass
