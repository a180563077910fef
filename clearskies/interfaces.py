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


# --- the share store, as the sync layer sees it -----------------------------


# --- sync: engine, sessions, read-only signing ------------------------------


# --- discovery sources and transports ---------------------------------------


# --- the daemon, as a share runtime and the control commands see it ---------
