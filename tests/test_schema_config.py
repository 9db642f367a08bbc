"""The schema file, Kong's validation rules applied to it, and the typed config."""

import json
import subprocess
import sys

import pytest

from kong_oauth2_introspection import schema
from kong_oauth2_introspection.introspection.config import Config, ConfigError

BASE = {"introspection_url": "https://idp.example/introspect", "authorization_value": "Basic abc"}


def test_enterprise_config_gets_enterprise_defaults():
    conf, errors = schema.validate(dict(BASE))
    assert errors == []
    assert conf["ttl"] == 30 and conf["timeout"] == 10000 and conf["keepalive"] == 60000
    assert conf["consumer_by"] == "username" and conf["anonymous"] == ""
    assert conf["introspect_request"] is False and conf["hide_credentials"] is False
    assert conf["run_on_preflight"] is True
    assert conf["custom_introspection_headers"] == {} and conf["custom_claims_forward"] == []
    assert conf["token_type_hint"] is None


def test_config_as_kong_sends_it_is_accepted():
    # Every field present, null where unset, Kong's own keys, empty sets as {}.
    filled, _ = schema.validate(dict(BASE))
    sent = json.loads(json.dumps(filled).replace("[]", "{}"))
    sent.update({"__seq__": 3, "__plugin_id": "0b4d8a5c-2f39-4a53-9b1e-3d8e0f1c1a11",
                 "token_type_hint": None})
    conf = Config.parse(sent)
    assert conf.custom_claims_forward == () and conf.ttl == 30 and conf.timeout == 10.0


@pytest.mark.parametrize("field,value,message", [
    ("introspection_url", None, "required field missing"),
    ("introspection_url", "ftp://idp/x", "invalid value"),
    ("consumer_by", "email", "expected one of: username, client_id"),
    ("ttl", "30", "expected a number"),
    ("timeout", 2.5, "expected an integer"),
    ("timeout", 0, "between"),
    ("custom_claims_forward", "scope", "expected a set"),
    ("max_retries", 11, "between"),
])
def test_kong_would_refuse(field, value, message):
    _, errors = schema.validate(dict(BASE, **{field: value}))
    assert errors and errors[0].path == "config." + field and message in errors[0].message


def test_unknown_field_refused():
    _, errors = schema.validate(dict(BASE, colour="red"))
    assert [str(e) for e in errors] == ["config.colour: unknown field"]


@pytest.mark.parametrize("secret,ok", [("a" * 16, True), ("a" * 24, True), ("a" * 32, True),
                                       ("a" * 20, False), ("", False)])
def test_store_secret_lengths(secret, ok):
    _, errors = schema.validate(dict(BASE, store={"secret": secret}))
    assert (errors == []) is ok
    assert all(secret not in str(e) for e in errors if secret)


def test_secret_value_never_echoed_in_errors():
    _, errors = schema.validate(dict(BASE, authorization_value=12345))
    assert errors and "12345" not in str(errors)


def test_typed_config_converts_units_and_names():
    conf = Config.parse(dict(BASE, timeout=2500, keepalive=0,
                             custom_introspection_headers={"x_tenant_id": "t1"},
                             forward_headers={"Group": "grp", "Name": "user.name"}))
    assert conf.timeout == 2.5 and conf.keepalive == 0
    assert [(n, t.text) for n, t in conf.custom_introspection_headers] == [("x-tenant-id", "t1")]
    assert dict(conf.forward_headers) == {"Group": ("grp",), "Name": ("user", "name")}
    assert "group" in conf.owned_headers and "x-consumer-id" in conf.owned_headers
    assert "Basic abc" not in repr(conf)


def test_bad_claims_expression_names_field_and_column():
    with pytest.raises(ConfigError) as err:
        Config.parse(dict(BASE, claims="Equals(`grp`, `admin`"))
    assert err.value.field == "config.claims" and "col" in err.value.message


def test_bad_header_name_refused():
    with pytest.raises(ConfigError) as err:
        Config.parse(dict(BASE, forward_headers={"Bad Header": "grp"}))
    assert err.value.field == "config.forward_headers"


def test_dump_is_what_kong_reads():
    dumped = {}
    for name in ("oauth2-introspection", "oauth2-client-credentials"):
        # one plugin per query command (Kong 3.9 registers only the first entry)
        out = subprocess.run([sys.executable, "-m", "kong_oauth2_introspection.cli", "dump",
                              "--plugin", name], capture_output=True, text=True,
                             check=True).stdout
        (plugin,) = json.loads(out)
        assert plugin["Name"] == name
        assert plugin["Schema"] == schema.load(name).kong_schema(), name
        dumped[name] = plugin
    info = dumped["oauth2-introspection"]
    assert info["Name"] == "oauth2-introspection" and info["Priority"] == 1700
    assert info["Phases"] == ["access"]
    by_name = {name: spec for entry in info["Schema"]["fields"] for name, spec in entry.items()}
    fields = by_name["config"]["fields"]
    assert fields == schema.kong_fields()
    # The whole Schema, consumer and protocols restrictions included.
    assert info["Schema"] == schema.INTROSPECTION.kong_schema()
    assert "description" not in json.dumps(fields)  # docs stay ours, Kong never sees them


def test_readme_option_table_is_generated_from_schema():
    import pathlib
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    assert schema.markdown_table() in readme


# --- Kong's schema engine rules (kong/db/schema/init.lua, Kong 3.9) -----------------
# Each expected answer below is what Kong's validate_field / process_auto_fields
# decide for the same input; the comment names the rule.

def _errors(**config):
    return [str(e) for e in schema.validate(dict(BASE, **config))[1]]


def test_empty_string_refused_where_kong_refuses_it():
    # validate_field: "empty strings are not accepted by default" (len_min = 1),
    # for plain fields, map values, set elements and nested records alike.
    assert _errors(token_type_hint="") == ["config.token_type_hint: length must be at least 1"]
    assert _errors(custom_introspection_headers={"x_tenant": ""}) == [
        "config.custom_introspection_headers.x_tenant: length must be at least 1"]
    # ... map keys too, though there the field's own `err` replaces Kong's message.
    assert _errors(forward_headers={"": "sub"}) == [
        "config.forward_headers: key '': must be a header name: "
        "letters, digits and !#$%&'*+-.^_`|~ only"]
    assert _errors(custom_claims_forward=["scope", ""]) == [
        "config.custom_claims_forward.2: length must be at least 1"]
    assert _errors(token_source={"query": ""}) == [
        "config.token_source.query: length must be at least 1"]


def test_empty_string_accepted_where_len_min_is_zero():
    # A field declaring len_min = 0 overrides the default of 1.
    assert _errors(anonymous="", store={"key_prefix": ""}) == []


def test_vault_reference_accepted_in_referenceable_fields():
    # validate_field: `if field.referenceable and is_reference(value) then return true`,
    # before any validator: store.secret's length rule does not apply to the reference.
    assert _errors(authorization_value="{vault://env/introspection-auth}",
                   store={"secret": "{vault://env/cache-key}",
                          "redis": {"password": "{vault://aws/redis/password}"}},
                   client_tls={"cert": "PEM", "key": "{vault://hcv/tls/key}"}) == []


def test_vault_reference_refused_in_other_fields():
    # Not referenceable: the reference is an ordinary string and meets the field's rules.
    assert _errors(introspection_url="{vault://env/url}") == [
        "config.introspection_url: invalid value: {vault://env/url}"]
    assert _errors(consumer_by="{vault://env/by}") == [
        "config.consumer_by: expected one of: username, client_id"]


def test_almost_references_are_checked_as_values():
    # kong.vault.is_reference: "{vault://" at the start and "}" at the end, nothing less.
    for text in ("{vault:/env/k}", "vault://env/k", "{vault://env/k"):
        assert _errors(store={"secret": text}) == [
            "config.store.secret: must be 16, 24 or 32 bytes long"], text


def test_every_error_reported_with_its_path():
    # Kong validates every field and reports each one that fails (one rule per field).
    errors = _errors(introspection_url="ftp://idp", ttl=-1, consumer_by="email",
                     custom_claims_forward=["a", 3], colour="red",
                     store={"redis": {"endpoints": ["redis:6379", "redis"], "database": 1001,
                                      "tls": {"enabled": "yes"}}})
    assert sorted(errors) == sorted([
        "config.introspection_url: invalid value: ftp://idp",
        "config.ttl: value should be between 0 and 31536000",
        "config.consumer_by: expected one of: username, client_id",
        "config.custom_claims_forward.2: expected a string",
        "config.colour: unknown field",
        "config.store.redis.endpoints.2: invalid value: redis",
        "config.store.redis.database: value should be between 0 and 1000",
        "config.store.redis.tls.enabled: expected a boolean",
    ])


def test_lengths_count_bytes_as_lua_does():
    # Lua's # (and so len_min/len_max and the secret's patterns) counts bytes.
    assert _errors(store={"secret": "é" * 12}) == []          # 12 characters, 24 bytes
    assert _errors(store={"secret": "é" * 16}) == []          # 16 characters, 32 bytes
    assert _errors(store={"secret": "é" * 8 + "a"}) == [      # 9 characters, 17 bytes
        "config.store.secret: must be 16, 24 or 32 bytes long"]


def test_secret_values_never_echoed():
    # Kong's "invalid value: %s" would print the value; ours hides referenceable ones.
    secret = "Basic c2VjcmV0OnZhbHVl"
    spec = {"type": "string", "referenceable": True, "match": "^Bearer "}
    fake = schema.PluginSchema({"name": "x", "fields": [{"authorization_value": spec}]})
    errors = fake.validate({"authorization_value": secret})[1]
    assert [str(e) for e in errors] == ["config.authorization_value: invalid value: (hidden)"]


def test_sets_lose_duplicates_records_get_defaults():
    # process_auto_fields: make_set removes duplicates; a record nobody set is
    # built from its fields' defaults (make_records_required).
    conf, errors = schema.validate(dict(BASE, custom_claims_forward=["scope", "sub", "scope"]))
    assert errors == [] and conf["custom_claims_forward"] == ["scope", "sub"]
    assert conf["store"]["redis"]["timeout_ms"] == 500 and conf["store"]["redis"]["tls"] == {
        "enabled": False, "ca": None, "cert": None, "key": None, "insecure_skip_verify": False}
    assert conf["timeout"] == 10000 and isinstance(schema.validate(
        dict(BASE, timeout=2500.0))[0]["timeout"], int)


def test_explicit_null_on_required_field_refused():
    # validate_field: a null value on a required field is "required field missing",
    # default or not (only an absent field gets the default).
    assert _errors(consumer_by=None) == ["config.consumer_by: required field missing"]
    assert _errors(store=None) == ["config.store: required field missing"]
    assert _errors(token_type_hint=None) == []


def test_empty_lua_tables_accepted_either_way():
    # cjson cannot tell an empty array from an empty object: Kong sends {} for an
    # empty set and [] for an empty map or record.
    assert _errors(custom_claims_forward={}, forward_headers=[], token_source=[]) == []


def test_optional_records_not_marked_required_in_table():
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip()
            for line in schema.markdown_table().splitlines()[2:]}
    assert rows["`introspection_url`"] == "*required*"
    assert rows["`store`"] == rows["`store.redis`"] == rows["`client_tls`"] == ""
    assert rows["`token_type_hint`"] == "" and rows["`ttl`"] == "30"


# --- what Kong's loader gets ------------------------------------------------------

# Kong 3.9's metaschema (kong/db/schema/metaschema.lua): the attributes a field may
# carry, and the types some of them are limited to. MetaSubSchema takes only these
# top-level keys; anything else makes Kong refuse to load the plugin.
_FIELD_ATTRIBUTES = {
    "type", "required", "reference", "description", "examples", "auto", "unique",
    "unique_across_ws", "on_delete", "default", "abstract", "generate_admin_api",
    "immutable", "err", "encrypted", "referenceable", "json_schema",
    "between", "eq", "ne", "gt", "len_eq", "len_min", "len_max", "match", "not_match",
    "match_all", "match_none", "match_any", "starts_with", "one_of", "not_one_of",
    "contains", "is_regex", "timestamp", "uuid", "mutually_exclusive_subsets",
    "elements", "keys", "values", "fields", "entity_checks", "shorthand_fields"}
_ATTRIBUTE_TYPES = {"between": {"integer", "number"}, "match": {"string"},
                    "one_of": {"string", "number", "integer"},
                    "len_eq": {"array", "set", "string", "map"}, "uuid": {"string"}}
# metaschema.lua's entity_checkers: the rules and the keys their record takes.
_ENTITY_CHECKERS = {
    "at_least_one_of": None, "only_one_of": None, "distinct": None,
    "mutually_required": None, "mutually_exclusive": None,
    "conditional": {"if_field", "if_match", "then_field", "then_match", "then_err"},
    "conditional_at_least_one_of": {"if_field", "if_match", "then_at_least_one_of", "then_err",
                                    "else_match", "else_then_at_least_one_of", "else_then_err"},
}
_REQUIRED_ATTRIBUTES = {"array": {"elements"}, "set": {"elements"},
                        "map": {"keys", "values"}, "record": {"fields"}}


def _metaschema_problems(name, field):
    found = [f"{name}: unknown attribute {k}" for k in field if k not in _FIELD_ATTRIBUTES]
    found += [f"{name}: {k} on a {field['type']}" for k, kinds in _ATTRIBUTE_TYPES.items()
              if k in field and field["type"] not in kinds]
    found += [f"{name}: needs {k}" for k in _REQUIRED_ATTRIBUTES.get(field["type"], ())
              if k not in field]
    for part in ("elements", "keys", "values"):
        if part in field:
            found += _metaschema_problems(f"{name}.{part}", field[part])
    for entry in field.get("fields", []):
        assert len(entry) == 1
        (sub, spec), = entry.items()
        found += _metaschema_problems(f"{name}.{sub}", spec)
    return found


@pytest.mark.parametrize("plugin", ["oauth2-introspection", "oauth2-client-credentials"])
def test_kong_schema_passes_kongs_metaschema(plugin):
    try:
        plugin_schema = schema.load(plugin)
    except FileNotFoundError:
        pytest.skip(f"schema/{plugin}.json not there yet")
    dumped = plugin_schema.kong_schema()
    assert set(dumped) == {"name", "fields", "entity_checks"} and dumped["name"] == plugin
    for check in dumped["entity_checks"]:   # the metaschema's entity_checks_schema
        (rule, arg), = check.items()
        assert rule in _ENTITY_CHECKERS, check
        assert set(arg) <= _ENTITY_CHECKERS[rule] if isinstance(arg, dict) else \
            all(isinstance(name, str) for name in arg)
    assert _metaschema_problems("", {"type": "record", "fields": dumped["fields"]}) == []
    text = json.dumps(dumped)
    assert '"traefik"' not in text and '"origin"' not in text and '"description"' not in text


def test_kong_schema_restricts_consumer_and_protocols():
    fields = {name: spec for entry in schema.INTROSPECTION.kong_schema()["fields"]
              for name, spec in entry.items()}
    assert list(fields) == ["consumer", "protocols", "config"]
    # typedefs.no_consumer: a foreign key to consumers that must equal null; the JSON
    # null is what Kong's cjson decodes to ngx.null.
    assert '"eq": null' in json.dumps(fields["consumer"])
    assert fields["consumer"]["type"] == "foreign" and fields["consumer"]["reference"] == "consumers"
    # typedefs.protocols_http in Kong 3.9 OSS.
    assert fields["protocols"]["default"] == ["grpc", "grpcs", "http", "https"]
    assert fields["protocols"]["elements"]["one_of"] == ["grpc", "grpcs", "http", "https"]


def test_plugin_entity_rules():
    entry = {"name": "oauth2-introspection", "config": dict(BASE)}
    assert schema.INTROSPECTION.validate_plugin(entry) == []
    # A null consumer is exactly what no_consumer asks for.
    assert schema.INTROSPECTION.validate_plugin(dict(entry, consumer=None, tags=None)) == []
    assert [str(v) for v in schema.INTROSPECTION.validate_plugin(
        dict(entry, consumer={"id": "8d2f1c5e-0000-4000-8000-000000000000"},
             protocols=["https", "tcp"], enabled="yes", colour=1))] == [
        "enabled: expected a boolean",
        "colour: unknown field",
        "consumer: oauth2-introspection cannot be scoped to a consumer: "
        "it authenticates the caller, which is how Kong learns the consumer",
        "protocols.2: expected one of: grpc, grpcs, http, https",
    ]


# --- Lua patterns, judged as LuaJIT judges them -----------------------------------

lupa = pytest.importorskip("lupa.luajit21")
from hypothesis import given, settings, strategies as st  # noqa: E402

from kong_oauth2_introspection import luapattern  # noqa: E402

_LUA = lupa.LuaRuntime(encoding=None)
_LUA_FIND = _LUA.eval("function(s, p) return string.match(s, p) ~= nil end")


def _schema_patterns():
    found = set()
    for _, spec in schema._walk(schema.FIELDS, "config"):
        for part in (spec, spec.get("elements") or {}, spec.get("keys") or {},
                     spec.get("values") or {}):
            found.update(filter(None, [part.get("match"), part.get("not_match")]))
            found.update(part.get("match_any", {}).get("patterns", []))
    return sorted(found)


_PATTERNS = _schema_patterns() + [
    "^[%w%.%-%_~]+$", "^%a+://[^/]+", "[]]", "[^]]", "[%]a-]", "a-b", "^a*$", "%s+$",
    "^$", "x$y", "a^", "[%a-]", "%p", "%c", "%g+", "%u%l", "%x%x", "%.", "[A-Z]%d?",
]


@pytest.mark.parametrize("pattern", _PATTERNS)
@settings(max_examples=60, deadline=None)
@given(value=st.text(alphabet=st.sampled_from("aZ09.-_:/\\]^$ \t\né%{}!#&'*+`|~(\""), max_size=40))
def test_lua_patterns_match_as_luajit(pattern, value):
    expected = _LUA_FIND(value.encode(), pattern.encode())
    assert luapattern.find(pattern, value) is expected


def test_schema_patterns_match_their_examples():
    assert _schema_patterns()  # the schema does use patterns: the test above covers them
    for pattern, value in [("^.+:%d+$", "redis:6379\n"), ("^[Hh][Tt][Tt][Pp][Ss]?://[^/]", "HTTPS://x")]:
        assert luapattern.find(pattern, value) is _LUA_FIND(value.encode(), pattern.encode())


def test_header_names_checked_by_the_schema():
    # Header names are RFC 7230 tokens: Kong itself refuses others, as a `match`.
    message = "must be a header name: letters, digits and !#$%&'*+-.^_`|~ only"
    assert _errors(forward_headers={"X-User": "sub", "Bad Header": "grp", "Ok!#$%&'*+-.^_`|~": "a"},
                   token_source={"header": "X Token"}) == [
        f"config.token_source.header: {message}",
        f"config.forward_headers: key 'Bad Header': {message}"]
    assert _errors(custom_introspection_headers={"x_tenant:": "t"}) == [
        f"config.custom_introspection_headers: key 'x_tenant:': {message}"]


def test_certificate_and_key_go_together():
    # entity_checks mutually_required: "all or none of these fields must be set";
    # Kong skips the check when one of them is a vault reference.
    assert _errors(client_tls={"cert": "PEM"}) == [
        "config.client_tls: all or none of these fields must be set: 'cert', 'key'"]
    assert _errors(store={"redis": {"tls": {"key": "PEM"}}}) == [
        "config.store.redis.tls: all or none of these fields must be set: 'cert', 'key'"]
    assert _errors(client_tls={"cert": "PEM", "key": "PEM"}) == []
    # Kong lets a key that is a reference through without its cert; the plugin could
    # not use it, so the offline check still says so, and says that Kong would not.
    assert _errors(client_tls={"key": "{vault://env/tls-key}"}) == [
        "config.client_tls: all or none of these fields must be set: 'cert', 'key'"
        + schema.KONG_SKIPS]
    assert schema.validate(dict(BASE, client_tls={"key": "{vault://env/tls-key}"}),
                           kong=True)[1] == []


def test_unsupported_schema_constructs_refused_at_load():
    with pytest.raises(ValueError, match="not supported"):
        schema.PluginSchema({"name": "x", "fields": [{"a": {"type": "string", "match": "%b()"}}]})
    with pytest.raises(ValueError, match="not supported"):
        schema.PluginSchema({"name": "x", "fields": [{"r": {
            "type": "record", "fields": [{"a": {"type": "string"}}],
            "entity_checks": [{"conditional": {"if_field": "a"}}]}}]})


# --- entity checks: what Kong refuses because the plugin could not run it ----------------
# Each case: plugin, config, the line `check` prints (after "plugins[0]."), and the
# text the stand-in's Kong schema layer (Admin API / POST /config) refuses it with.
# The checks come from the dumped schema alone: the stand-in reads them from the
# query command, as Kong 3.9 does (process.lua: schema = info.Schema).

_IDP = {"introspection_url": "https://idp.test/introspect"}
_CC = {"url": "https://idp.test/token", "audience": "https://api.test"}
_JWT = "application/token-introspection+jwt"
_BASIC = {"introspection_endpoint_auth_method": "client_secret_basic", "client_id": "kong",
          "client_secret": "s3cret"}
_COND = "required field missing (failed conditional validation given value of field '%s')"
_METHOD = "config.introspection_endpoint_auth_method"
ENTITY_CASES = [
    ("neither", "oauth2-introspection", {},
     "config.authorization_value: at least one of these fields must be non-empty: "
     "'config.authorization_value', 'config.introspection_endpoint_auth_method'",
     "at least one of these fields must be non-empty"),
    ("both", "oauth2-introspection", dict(_BASIC, authorization_value="Basic eDp5"),
     "config.authorization_value: only one or none of these fields must be set: "
     "'config.authorization_value', 'config.introspection_endpoint_auth_method'",
     "only one or none of these fields must be set"),
    ("method-without-client_id", "oauth2-introspection",
     {"introspection_endpoint_auth_method": "client_secret_post", "client_secret": "s"},
     "config.client_id: " + _COND % _METHOD, "config.client_id: required field missing"),
    ("basic-without-secret", "oauth2-introspection",
     {"introspection_endpoint_auth_method": "client_secret_basic", "client_id": "kong"},
     "config.client_secret: " + _COND % _METHOD, "config.client_secret: required field missing"),
    ("secret_jwt-with-rsa", "oauth2-introspection",
     {"introspection_endpoint_auth_method": "client_secret_jwt", "client_id": "kong",
      "client_secret": "s", "client_alg": "RS256"},
     "config.client_alg: expected one of: HS256, HS384, HS512 (with %s client_secret_jwt, "
     "client_alg must be HS256, HS384 or HS512)" % _METHOD, "client_alg must be HS256"),
    ("private_key_jwt-without-jwk", "oauth2-introspection",
     {"introspection_endpoint_auth_method": "private_key_jwt", "client_id": "kong"},
     "config.client_jwk: " + _COND % _METHOD, "config.client_jwk: required field missing"),
    ("private_key_jwt-with-hmac", "oauth2-introspection",
     {"introspection_endpoint_auth_method": "private_key_jwt", "client_id": "kong",
      "client_jwk": "{vault://env/jwk}", "client_alg": "HS256"},
     "config.client_alg: expected one of: RS256, RS384, RS512, PS256, PS384, PS512, ES256, "
     "ES384, ES512, EdDSA (with %s private_key_jwt, client_alg must be an asymmetric "
     "algorithm)" % _METHOD, "client_alg must be an asymmetric algorithm"),
    ("tls_client_auth-without-cert", "oauth2-introspection",
     {"introspection_endpoint_auth_method": "tls_client_auth", "client_id": "kong"},
     "config.client_tls.cert: " + _COND % _METHOD,
     "config.client_tls.cert: required field missing"),
    ("pre_authorization-without-method", "oauth2-introspection",
     {"authorization_value": "Basic eDp5", "pre_authorization": {"token_url": "https://idp/t"}},
     "%s: " % _METHOD + _COND % "config.pre_authorization.token_url",
     "%s: required field missing" % _METHOD),
    ("signed-without-issuer", "oauth2-introspection",
     {"authorization_value": "Basic eDp5", "introspection_accept": _JWT, "client_id": "rs"},
     "config.issuer: " + _COND % "config.introspection_accept",
     "config.issuer: required field missing"),
    ("signed-without-client_id", "oauth2-introspection",
     {"authorization_value": "Basic eDp5", "introspection_accept": _JWT,
      "issuer": "https://idp.test"},
     "config.client_id: " + _COND % "config.introspection_accept",
     "config.client_id: required field missing"),
    ("jwt-header-without-signed", "oauth2-introspection",
     {"authorization_value": "Basic eDp5", "upstream_introspection_jwt_header": "X-Intro-JWT"},
     "config.introspection_accept: value must be %s (config.upstream_introspection_jwt_header "
     "needs config.introspection_accept %s)" % (_JWT, _JWT), "needs config.introspection_accept"),
    ("cc-client_id-without-secret", "oauth2-client-credentials", {"client_id": "gw"},
     "config.client_id: all or none of these fields must be set: "
     "'config.client_id', 'config.client_secret'", "all or none of these fields must be set"),
    ("cc-redis-without-secret", "oauth2-client-credentials",
     {"store": {"redis": {"endpoints": ["redis:6379"]}}},
     "config.store.secret: " + _COND % "config.store.redis.endpoints",
     "config.store.secret: required field missing"),
]
# The same rules satisfied: Kong, check and the plugin all accept these.
ENTITY_GOOD = [
    ("oauth2-introspection", {"authorization_value": "Basic eDp5"}),
    ("oauth2-introspection", dict(_BASIC)),
    ("oauth2-introspection", {"introspection_endpoint_auth_method": "client_secret_jwt",
                              "client_id": "kong", "client_secret": "s", "client_alg": "HS384"}),
    ("oauth2-introspection", dict(_BASIC, pre_authorization={"token_url": "https://idp/t"})),
    ("oauth2-introspection", {"authorization_value": "Basic eDp5", "introspection_accept": _JWT,
                              "issuer": "https://idp.test", "client_id": "rs",
                              "upstream_introspection_jwt_header": "X-Intro-JWT"}),
    ("oauth2-client-credentials", {"client_id": "gw", "client_secret": "s"}),
    ("oauth2-client-credentials", {"store": {"redis": {"endpoints": []}}}),
    ("oauth2-client-credentials", {"store": {"redis": {"endpoints": ["redis:6379"]},
                                             "secret": "0123456789abcdef"}}),
]


def _full(plugin, config):
    return dict(_IDP if plugin == "oauth2-introspection" else _CC, **config)


def _check_lines(tmp_path, plugin, config):
    from kong_oauth2_introspection.ops import check
    from kong_oauth2_introspection.ops.guard import post_function_entry
    path = tmp_path / "kong.yml"
    plugins = [{"name": plugin, "config": _full(plugin, config)}, post_function_entry({})]
    path.write_text(json.dumps({"_format_version": "3.0", "plugins": plugins}))
    result = subprocess.run([sys.executable, "-m", "kong_oauth2_introspection.cli", "check",
                             str(path)], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    # The problems, without the summary ("...: 1 ... entry, all valid").
    return result.returncode, [x for x in result.stdout.splitlines() if not x.startswith(str(path))]


def test_every_entity_check_is_in_the_dumped_schema():
    rules = {json.dumps(check, sort_keys=True)
             for name in ("oauth2-introspection", "oauth2-client-credentials")
             for check in schema.load(name).kong_schema()["entity_checks"]}
    assert len(rules) == 14 and not any('"description"' in rule for rule in rules)


@pytest.mark.parametrize("case, plugin, config, line, refusal", ENTITY_CASES,
                         ids=[c[0] for c in ENTITY_CASES])
def test_kong_refuses_what_the_plugin_cannot_run(kong, cc_kong, case, plugin, config, line, refusal):
    kong = cc_kong if plugin == "oauth2-client-credentials" else kong   # its own server
    from kong import SchemaViolation
    with pytest.raises(SchemaViolation) as refused:
        kong.configure(_full(plugin, config), name=plugin)
    assert refused.value.path == "@entity" and refusal in refused.value.message


@pytest.mark.parametrize("case, plugin, config, line, refusal", ENTITY_CASES,
                         ids=[c[0] for c in ENTITY_CASES])
def test_check_refuses_the_same(tmp_path, case, plugin, config, line, refusal):
    code, lines = _check_lines(tmp_path, plugin, config)
    assert code == 1 and "plugins[0]." + line in lines, lines
    assert "eDp5" not in "\n".join(lines) and "s3cret" not in "\n".join(lines)


@pytest.mark.parametrize("plugin, config", ENTITY_GOOD)
def test_the_rules_satisfied_pass_kong_check_and_the_plugin(kong, cc_kong, tmp_path, plugin, config):
    kong = cc_kong if plugin == "oauth2-client-credentials" else kong   # its own server
    inst = kong.configure(_full(plugin, config), name=plugin)
    assert inst.plugin_id
    assert _check_lines(tmp_path, plugin, config) == (0, [])


@pytest.mark.parametrize("plugin, config, field", [
    ("oauth2-introspection", dict(_BASIC, authorization_value="{vault://env/intro-auth}"),
     "config.authorization_value"),
    ("oauth2-client-credentials", {"client_id": "{vault://env/cc-id}"}, "config.client_id"),
    ("oauth2-client-credentials", {"store": {"redis": {"endpoints": ["redis:6379"]},
                                             "secret": "{vault://env/k}"}}, None),
])
def test_a_vault_reference_makes_kong_skip_the_check_but_not_check(kong, cc_kong, tmp_path, plugin,
                                                                   config, field):
    kong = cc_kong if plugin == "oauth2-client-credentials" else kong   # its own server
    # run_entity_check: "Don't run if any of the values is a reference in a
    # referenceable field". Kong accepts; the plugin could not run it, so check says so.
    assert kong.configure(_full(plugin, config), name=plugin).plugin_id
    code, lines = _check_lines(tmp_path, plugin, config)
    if field is None:   # a reference that satisfies the rule: nothing to say
        assert (code, lines) == (0, [])
    else:
        assert code == 1 and len(lines) == 1 and lines[0].startswith("plugins[0]." + field)
        assert lines[0].endswith(schema.KONG_SKIPS) and "vault://" not in lines[0]


def test_the_plugin_answers_unusable_config_with_the_schema_rule():
    # The runtime parses with the same schema data: no second copy of these rules.
    from kong_oauth2_introspection.client_credentials.config import (Config as CCConfig,
                                                                     ConfigError as CCError)
    with pytest.raises(ConfigError) as err:
        Config.parse(dict(_IDP, authorization_value="Basic eDp5", introspection_accept=_JWT,
                          client_id="rs"))
    assert err.value.field == "config.issuer"
    with pytest.raises(CCError, match=r"config.store.secret: required field missing"):
        CCConfig.parse(dict(_CC, store={"redis": {"endpoints": ["redis:6379"]}}))
