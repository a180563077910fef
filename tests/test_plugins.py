"""The twistd plugins are discoverable after installation."""

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins


def test_both_service_makers_are_listed():
    """getPlugins finds the daemon and the tracker service makers by tapname."""
    names = {maker.tapname for maker in getPlugins(IServiceMaker)}
    assert {"clearskies", "clearskies-tracker"} <= names
