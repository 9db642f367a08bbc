"""A Kong Gateway 3.9 stand-in for tests, as a package whose modules mirror
Kong's parts: lua (Lua values, cjson, MessagePack, patterns), schema (the schema
layer and the config a plugin gets), nginx (what nginx does to a request), state
(ngx.var / ctx / the upstream request), pdk (the Lua-side PDK), rpc (mp_rpc.lua),
instances (plugin.lua's instance table), guard (the bundled post-function plugin),
admin (Admin API consumers), result (what a test sees), standin (KongStandIn).
Facts: shared/design/kong-plugin-server.md."""

from .lua import LuaError, cjson_encode, lua_pattern_to_regex
from .nginx import CIMultiDict, encode_args, ngx_escape, ngx_unescape, parse_args
from .result import FailedOpen, Result, Upstream
from .schema import PluginSchema, SchemaViolation
from .standin import Instance, KongStandIn

__all__ = ["KongStandIn", "Instance", "Result", "Upstream", "FailedOpen", "SchemaViolation",
           "PluginSchema", "CIMultiDict", "LuaError", "cjson_encode", "lua_pattern_to_regex",
           "encode_args", "parse_args", "ngx_escape", "ngx_unescape"]
