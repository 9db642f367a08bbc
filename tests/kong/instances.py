"""Kong's table of running plugin instances.

Mirrors kong/runloop/plugin_servers/plugin.lua (Kong 3.9) ``get_instance_id``:
one entry per plugin id; a request that finds another request starting the
instance waits in 0.1 s steps, 10 s at most, then gives up with ``Could not claim
instance_id for NAME (key: ID)`` (mp_rpc.lua logs it and the request goes on
WITHOUT the plugin: fail open). A new ``__seq__`` starts a new instance and closes
the old one (errors ignored). A failed ``plugin.StartInstance`` is logged
(``starting instance: ...``) and raised as a Lua error: 500. ``reset`` is
``reset_instances_for_plugin`` (after ``no plugin instance``) and the ``serverPid``
notification's reset when the server's pid changes.
"""

import threading
import time
from typing import Any, Dict, Optional

from .lua import LuaError
from .result import Result
from .rpc import Rpc, RpcError

__all__ = ["Instances", "ClaimFailed"]


class ClaimFailed(Exception):
    """get_instance_id's ``nil, err`` after waiting for another request's claim."""


class Instances(object):
    def __init__(self, claim_wait: float = 10.0) -> None:
        self.claim_wait = claim_wait
        self._step = claim_wait / 100.0        # Kong: 100 steps of 0.1 s
        self._lock = threading.Lock()
        self._running: Dict[str, Dict[str, Any]] = {}
        self.server_pid: Optional[int] = None

    def get_id(self, rpc: Rpc, inst: Any, result: Result) -> Any:
        key = inst.plugin_id
        deadline = time.monotonic() + self.claim_wait
        while True:
            # the check and the claim are atomic in Lua (no yield between them)
            with self._lock:
                info = self._running.get(key)
                if info is None or info["id"] is not None:
                    if info is not None and info["seq"] == inst.seq:
                        return info["id"]
                    old_id = info["id"] if info is not None else None
                    if info is None:
                        info = {"id": None, "seq": inst.seq, "name": inst.name}
                        self._running[key] = info
                    else:
                        info["id"] = None     # make it evident we are changing it
                    break
            if time.monotonic() > deadline:
                with self._lock:
                    self._running.pop(key, None)
                raise ClaimFailed("Could not claim instance_id for %s (key: %s)"
                                  % (inst.name, key))
            time.sleep(self._step)
        try:
            status = rpc.call("plugin.StartInstance", {"Name": inst.name, "Config": inst.conf_json})
            new_id = status["Id"]
        except (RpcError, TypeError, KeyError) as e:
            result.kong_logs.append(("err", "starting instance: %s" % e))
            with self._lock:
                self._running.pop(key, None)   # some other request might succeed
            raise LuaError(str(e))
        with self._lock:
            info.update(id=new_id, seq=inst.seq, name=inst.name)
        if old_id is not None:
            try:
                rpc.call("plugin.CloseInstance", old_id)
            except (RpcError, LuaError):
                pass
        return new_id

    def reset(self, plugin_name: Optional[str] = None) -> None:
        with self._lock:
            for k in [k for k, v in self._running.items()
                      if plugin_name is None or v.get("name") == plugin_name]:
                del self._running[k]

    def notification(self, label: str, args: Any) -> None:
        if label == "serverPid":
            try:
                pid = int(args)
            except (TypeError, ValueError):
                return
            if self.server_pid is not None and pid != self.server_pid:
                self.reset()
            self.server_pid = pid

    def ids(self) -> Dict[str, Any]:
        with self._lock:
            return {k: v["id"] for k, v in self._running.items() if v["id"] is not None}
