"""Settings shared by the whole suite."""

from hypothesis import HealthCheck, settings

# The machine is small and shared: no per-example deadlines, modest example counts.
settings.register_profile(
    "clearskies", deadline=None, max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("clearskies")

# The end-to-end harness fixture, available to every test module.
from tests.daemons import daemon_factory  # noqa: E402,F401
