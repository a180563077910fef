"""twistd entry point for the tracker: ``twistd -n clearskies-tracker``."""

from twisted.application.service import MultiService
from twisted.python import usage


class Options(usage.Options):
    optParameters = [["listen", "l", "tcp:49200", "Endpoint to listen on."]]


def makeService(options: Options) -> MultiService:
    return MultiService()
