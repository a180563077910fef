"""twistd entry point for the daemon: ``twistd -n clearskies --share PATH``."""

from twisted.application.service import MultiService
from twisted.python import usage


class Options(usage.Options):
    synopsis = "--share PATH [--share PATH …]"

    def __init__(self) -> None:
        super().__init__()
        self["shares"] = []

    def opt_share(self, path: str) -> None:
        """Directory to keep in sync (repeatable)."""
        self["shares"].append(path)


def makeService(options: Options) -> MultiService:
    return MultiService()
