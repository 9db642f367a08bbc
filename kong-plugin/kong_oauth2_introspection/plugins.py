"""The plugins one plugin-server process hosts (Kong's query command lists them all)."""

from .client_credentials.handler import Plugin as ClientCredentials
from .handler import Plugin as Introspection

ALL = (Introspection, ClientCredentials)
