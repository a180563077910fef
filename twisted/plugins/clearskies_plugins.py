"""twistd plugins: ``twistd -n clearskies …`` and ``twistd -n clearskies-tracker …``.

ServiceMaker imports the named module only when the plugin is used, so
listing plugins stays cheap.
"""

from twisted.application.service import ServiceMaker

clearskiesDaemon = ServiceMaker(
    "ClearSkies daemon",
    "clearskies.tap",
    "Keep shared directories in sync with peers (ClearSkies protocol).",
    "clearskies",
)

clearskiesTracker = ServiceMaker(
    "ClearSkies tracker",
    "clearskies.tracker.tap",
    "Tracker that helps ClearSkies peers find each other.",
    "clearskies-tracker",
)
