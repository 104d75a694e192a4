"""User-facing errors: each message names the problem and the fix, on one line."""


class FedgeError(Exception):
    """A problem the user can fix (bad config, missing package, corrupt file)."""


class MissingPackageError(FedgeError):
    """A model or dataset package is not installed."""

    def __init__(self, what: str, install: str) -> None:
        super().__init__(f"{what} is not installed: run `{install}` (or `bash scripts/install.sh`)")
        self.install = install
