"""What every plugin the server hosts shares: one instance per config Kong starts,
one runtime per distinct config.

Kong starts an instance for each plugin entity and nginx worker, adding keys of
its own to the config (``route_id``, ``__seq__``, ...). Instances whose plugin
fields are equal share one runtime (HTTP pools, caches, Redis connections) from
the plugin's bounded registry, released when Kong closes the instance. A config
the plugin cannot use becomes ``Unusable``: every request under it is answered
500 with the reason in the log, never an exception out of StartInstance.
"""

import hashlib
import json
from typing import Any, ClassVar, Dict, Optional, Tuple, Type

from ..ops.log import LOG
from ..kong.refusals import scope_of
from ..schema import PluginSchema
from .registry import Registry


class Unusable:
    """A config the plugin cannot use; ``error`` says why (a field, never a value)."""

    def __init__(self, error: Exception):
        self.error = error

    def close(self) -> None:
        pass


class PluginInstance:
    NAME: ClassVar[str]
    VERSION: ClassVar[str]
    PRIORITY: ClassVar[int]
    PHASES: ClassVar[Tuple[str, ...]] = ("access",)
    SCHEMA: ClassVar[PluginSchema]
    RUNTIMES: ClassVar[Registry]
    # What ``build`` raises for a config it refuses: its text is safe to log.
    CONFIG_ERRORS: ClassVar[Tuple[Type[Exception], ...]] = (ValueError,)

    @classmethod
    def kong_schema(cls) -> Dict[str, Any]:
        return cls.SCHEMA.kong_schema()

    @classmethod
    def build(cls, conf_only: Dict[str, Any]) -> Any:
        """The runtime for a config (the plugin's own fields only)."""
        raise NotImplementedError

    def __init__(self, config: Any):
        conf_only = self.SCHEMA.from_kong(config)
        self.scope = scope_of(config)   # where refusals say they happened
        self._key: Optional[str] = hashlib.sha256(
            json.dumps(conf_only, sort_keys=True, default=str).encode()).hexdigest()
        self.runtime = self.RUNTIMES.acquire(self._key, lambda: self._build(conf_only))

    @classmethod
    def _build(cls, conf_only: Dict[str, Any]) -> Any:
        try:
            return cls.build(conf_only)
        except cls.CONFIG_ERRORS as err:
            unusable = Unusable(err)
        except Exception as err:  # noqa: BLE001 - e.g. an unreadable PEM: its text may hold secrets
            unusable = Unusable(ValueError("config: cannot be used (%s)" % type(err).__name__))
        LOG.err("%s: unusable config, every request under it gets 500: %s"
                % (cls.NAME, unusable.error))
        return unusable

    def close(self) -> None:
        key, self._key = self._key, None
        if key is not None:
            self.RUNTIMES.release(key)
