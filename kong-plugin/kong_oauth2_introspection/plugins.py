"""The plugins one plugin-server process hosts (Kong's query command lists them all)."""

from .handler import Plugin as Introspection

ALL = (Introspection,)
