"""The schema file, Kong's validation rules applied to it, and the typed config."""

import json
import subprocess
import sys

import pytest

from kong_oauth2_introspection import schema
from kong_oauth2_introspection.config import Config, ConfigError

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
    out = subprocess.run([sys.executable, "-m", "kong_oauth2_introspection.cli", "-dump"],
                         capture_output=True, text=True, check=True).stdout
    info, = json.loads(out)
    assert info["Name"] == "oauth2-introspection" and info["Priority"] == 1700
    assert info["Phases"] == ["access"]
    fields = info["Schema"]["fields"][0]["config"]["fields"]
    assert fields == schema.kong_fields()
    assert "description" not in json.dumps(fields)  # docs stay ours, Kong never sees them


def test_readme_option_table_is_generated_from_schema():
    import pathlib
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    assert schema.markdown_table() in readme
