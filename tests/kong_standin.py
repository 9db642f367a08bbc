"""Compatibility shim: the Kong stand-in is now the package tests/kong/."""

from kong import *  # noqa: F401,F403
from kong import __all__  # noqa: F401
