"""Kong's bundled ``post-function`` plugin running a guard snippet, with lupa.

Mirrors kong/plugins/pre-function/_handler.lua (post-function shares it; priority
-1000, here the access phase only): each chunk of ``config.access`` is compiled
once; on its first run, if the chunk returns a function, that function is called
and then used for every later request (the "0.2.0+" style); otherwise the chunk
itself runs on every request. ``kong.response.exit`` ends the request there; a Lua
error fails it with 500 (the runloop's handler). Like any plugin it runs after ours
when ours let the request through, and also when the plugin server failed open
(design page: a guard turned every fail-open pass-through into a 503).

The ``kong`` table given to the snippet is backed by the request's state:
kong.client.get_credential / get_consumer, kong.request.get_method / get_header /
get_path, kong.response.exit, kong.log.err / warn / notice / info / debug and
kong.ctx.shared. LuaJIT (lupa.luajit21) when it imports, else Lua 5.1.
"""

import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

try:
    import lupa.luajit21 as lupa_impl
except ImportError:  # pragma: no cover - depends on the lupa build
    import lupa.lua51 as lupa_impl  # type: ignore[no-redef]

from .lua import LuaError, lua_tostring
from .pdk import PDK, Exited, header_values
from .state import RequestState

__all__ = ["PostFunction"]

# The Lua half: compiles the chunks in a sandbox whose only globals are safe
# builtins plus ``kong``; runs them with pcall, telling an exit from an error.
_DRIVER = b"""
local EXIT = setmetatable({}, {__tostring = function() return "exit" end})
local py
local kong = {client = {}, request = {}, response = {}, log = {}, ctx = {shared = {}}}
function kong.client.get_credential() return py.credential() end
function kong.client.get_consumer() return py.consumer() end
function kong.request.get_method() return py.method() end
function kong.request.get_path() return py.path() end
function kong.request.get_header(name)
  if type(name) ~= "string" then error("header name must be a string", 2) end
  return py.header(name)
end
function kong.response.exit(status, body, headers)
  local err = py.exit(status, body, headers)
  if err then error(err, 2) end
  error(EXIT, 0)
end
for _, level in ipairs({"err", "warn", "notice", "info", "debug", "crit", "alert"}) do
  kong.log[level] = function(...) py.log(level, ...) end
end

local safe = {}
for _, k in ipairs({"assert", "error", "ipairs", "next", "pairs", "pcall", "select",
                    "tonumber", "tostring", "type", "unpack", "xpcall", "string", "table",
                    "math"}) do
  safe[k] = _G[k]
end
safe.kong = kong
safe.ngx = {null = nil, HTTP_OK = 200}

local compiled = {}

local function compile(code, name)
  local chunk, err = load(code, name, "t", safe)
  if not chunk then return err end
  local fn, first = chunk, true
  compiled[#compiled + 1] = function()
    if first then
      first = false
      local result = fn()
      if type(result) == "function" then
        fn = result
        fn()
      end
    else
      fn()
    end
  end
end

local function run(bridge, shared)
  py = bridge
  kong.ctx.shared = shared
  for _, f in ipairs(compiled) do
    local ok, err = pcall(f)
    if not ok then
      if err == EXIT then return "exit" end
      return "error", tostring(err)
    end
  end
  return "ok"
end

return compile, run
"""


class PostFunction(object):
    def __init__(self, chunks: Sequence[str]) -> None:
        self.chunks = list(chunks)
        self._lock = threading.Lock()   # a LuaRuntime is not thread-safe
        self._rt = lupa_impl.LuaRuntime(encoding=None, unpack_returned_tuples=True)
        compile_chunk, self._run = self._rt.execute(_DRIVER)
        for i, code in enumerate(self.chunks):
            err = compile_chunk(code.encode("utf-8"), ("=post-function[%d]" % (i + 1)).encode())
            if err is not None:   # Kong's schema refuses code that does not compile
                raise ValueError("post-function chunk %d: %s" % (i + 1, self._py(err)))

    # ---- value conversion (Lua strings are bytes here, see lua.py)
    def _lua(self, v: Any) -> Any:
        if isinstance(v, str):
            return v.encode("utf-8", "surrogateescape")
        if isinstance(v, dict):
            return self._rt.table_from({self._lua(k): self._lua(x) for k, x in v.items()
                                        if x is not None})
        if isinstance(v, (list, tuple)):
            return self._rt.table_from([self._lua(x) for x in v])
        return v

    def _py(self, v: Any) -> Any:
        if isinstance(v, bytes):
            return v.decode("utf-8", "surrogateescape")
        if lupa_impl.lua_type(v) == "table":
            items = {self._py(k): self._py(x) for k, x in v.items()}
            if items and all(isinstance(k, int) for k in items) and \
                    sorted(items) == list(range(1, len(items) + 1)):
                return [items[i] for i in range(1, len(items) + 1)]
            return items
        return v

    def run(self, state: RequestState) -> None:
        """Runs the chunks on this request; an exit or a Lua error is recorded
        in ``state.result`` (status, body, guard_exit / kong_error)."""
        r = state.result
        exit_state: Dict[str, Any] = {}

        def exit_(status: Any, body: Any = None, headers: Any = None) -> Optional[bytes]:
            pdk = PDK(state)
            try:
                if not isinstance(status, (int, float)) or isinstance(status, bool):
                    raise LuaError("code must be a number")
                staged: List[Tuple[Any, List[str]]] = [
                    (k, header_values(k, v, multi=True))
                    for k, v in (self._py(headers) or {}).items()]
                pdk.send(int(status), self._py(body), staged)
            except LuaError as e:
                return str(e).encode()
            except Exited:
                exit_state["status"] = int(status)
            return None

        def log(level: bytes, *args: Any) -> None:
            r.logs.append((self._py(level), "".join(lua_tostring(self._py(a)) for a in args)))

        bridge = {
            "credential": lambda: self._lua(state.credential),
            "consumer": lambda: self._lua(state.consumer),
            "method": lambda: self._lua(state.method),
            "path": lambda: self._lua(state.path),
            "header": lambda name: self._lua(state.get_header(self._py(name))),
            "exit": exit_,
            "log": log,
        }
        with self._lock:
            shared = self._lua(dict(state.ctx_shared)) if state.ctx_shared else \
                self._rt.table_from({})
            outcome = self._run(self._rt.table_from({k.encode(): v for k, v in bridge.items()}),
                                shared)
            status, err = (outcome if isinstance(outcome, tuple) else (outcome, None))
            state.ctx_shared.clear()
            state.ctx_shared.update(self._py(shared) or {})
        if status == b"exit":
            r.guard_exit = exit_state.get("status")
        elif status == b"error":
            raise LuaError(self._py(err))
