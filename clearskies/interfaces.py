"""The seams between the layers, as zope.interface declarations.

Each interface says what flows between two parts of the daemon, so that one
side can be replaced (by a fake in the tests, or by a new transport or store)
without the other knowing. Implementers declare ``@implementer(IFoo)``; tests
that fake a seam check the fake with ``zope.interface.verify.verifyObject``.

This module imports nothing from the rest of the package: every layer may
depend on it, and it depends on none.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface  # noqa: F401


# --- blocking work: runners and disk jobs -----------------------------------


class IRunner(Interface):
    """Runs a blocking callable off the reactor thread and answers on it.

    The contract every runner honours, for any callable: ``run(fn, *args)``
    returns a Deferred that fires on the reactor thread with ``fn(*args)``'s
    result, or fails with the exception it raised (never raised by ``run``
    itself). ``fn`` gets plain values, returns plain values and never
    touches Twisted objects. A runner that runs its work in order says so;
    the one for tests runs it at once on the calling thread.
    """

    def run(fn, *args):  # type: ignore[no-untyped-def]
        """Run ``fn(*args)``; a Deferred with its result or its exception."""


# --- the share store, as the sync layer sees it -----------------------------


# --- sync: engine, sessions, read-only signing ------------------------------


# --- discovery sources and transports ---------------------------------------


# --- the daemon, as a share runtime and the control commands see it ---------
