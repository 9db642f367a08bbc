"""``kong-oauth2-introspection purge``: stop every node serving cached answers.

A token revoked at the IdP stays in the plugin's caches until its entry goes
stale (``ttl``). This command removes answers from Redis and tells every
plugin-server process on every node sharing that Redis (standalone, Sentinel or
Cluster) to drop its in-process copies; they do so as soon as the message
arrives (milliseconds).

Usage::

    kong-oauth2-introspection purge (--config JSON | --config @FILE | --kong-yml FILE)
                                    (--token-stdin | --token TOKEN | --sub SUB |
                                     --client-id ID | --all)

``--config`` is one plugin config (the ``config`` object of the plugin entry);
``--kong-yml`` takes every oauth2-introspection entry of a declarative config,
and purges each distinct store once. Kong vault references (``{vault://...}``)
are refused: only Kong can resolve them, and a wrong ``authorization_value``
would purge nothing without a word. The command needs the config because the
plugin's cache keys are HMACs keyed with what identifies the IdP (URL,
``authorization_value``, ...): ``--token`` is hashed here, and the token never
travels. Prefer ``--token-stdin``, which keeps the token out of the process list
and the shell history.

- by token: deletes the entry of that token (for configs without
  ``introspect_request`` or templated introspection headers, whose entries are
  also keyed by the request; purge those by ``sub`` or ``client_id``);
- by ``sub`` / ``client_id``: deletes every entry whose active answer has that
  claim, found through an index in Redis whose names hold an HMAC of the claim
  under a key derived from ``store.secret``, never the claim;
- ``--all``: deletes every key the plugin wrote under ``store.key_prefix`` (and
  nothing else, even with an empty prefix).

The message, published on channel ``<key_prefix>oauth2-introspection`` (the
channel of ``cache/tokens.py``'s announcements), is JSON::

    {"v": 1, "op": "purge", "by": "key" | "sub" | "client_id" | "all",
     "ids": [...], "keys": [...], "tombs": [...]}

``ids`` holds cache keys (``by: key``) or claim tags (``sub``, ``client_id``:
``HMAC-SHA256(SHA256("oauth2-introspection/index\\0" || store.secret),
kind || "\\0" || value)``, hex); ``keys`` the cache keys found in the index.
A process drops the listed keys and, for a tag, any entry whose claim has that
tag; ``all`` empties its in-process cache.

Before deleting anything the command leaves tombstones (``cache/tombstones.py``):
sealed records that make every process refuse, from then on, a value of the
purged key or claim fetched before the purge, whoever sets or announces it
again. ``"tombs"`` in the message carries them (base64), so a process need not
read them back. They live as long as the longest-lived answer the given configs
can keep (``ttl`` + ``stale_if_error``, ``TTL0_TOMBSTONE_LIFETIME`` for
``ttl: 0``), and are then folded into a watermark that keeps refusing older
values: a purge stays final.

Without ``store.redis`` there is nothing shared to purge: each process keeps its
own cache for at most ``ttl``; the command says so and exits 1.

Exit codes: 0 purged and announced; 1 Redis failed or no store; 2 usage error.
"""

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Tuple

from .. import NAME

USAGE_EXIT, FAILED_EXIT = 2, 1
# ttl 0 keeps answers until exp, unknown here: a day, then the watermark covers them.
TTL0_TOMBSTONE_LIFETIME = 86400.0


def tombstone_lifetime(conf) -> float:
    """How long an answer cached under ``conf`` may be used, at most (seconds)."""
    from ..cache.tombstones import SKEW
    ttl = conf.ttl if conf.ttl > 0 else TTL0_TOMBSTONE_LIFETIME
    return max(ttl + max(conf.stale_if_error, 0), conf.negative_ttl) + SKEW


class _Quiet:
    """The store's log: errors go to stderr (they are already redacted)."""

    def _w(self, msg: str) -> None:
        print("purge: " + msg, file=sys.stderr)

    info = warn = err = _w


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kong-oauth2-introspection purge",
                                description="Drop cached introspection answers on every node.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="the plugin config as JSON, or @FILE")
    src.add_argument("--kong-yml", help="a declarative config: every entry of this plugin")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--token-stdin", action="store_true", help="read the token from stdin")
    what.add_argument("--token", help="the token (visible in the process list: prefer "
                                      "--token-stdin)")
    what.add_argument("--sub", help="every answer with this sub")
    what.add_argument("--client-id", help="every answer with this client_id")
    what.add_argument("--all", action="store_true", help="everything under the key prefix")
    return p


def _configs(args) -> List[Dict[str, Any]]:
    if args.config is not None:
        text = args.config
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as handle:
                text = handle.read()
        conf = json.loads(text)
        if not isinstance(conf, dict):
            raise ValueError("--config is not a JSON object")
        return [conf]
    import yaml

    from .check import plugin_entries
    with open(args.kong_yml, encoding="utf-8") as handle:
        doc = yaml.safe_load(handle)
    return [entry.get("config") or {} for _loc, entry in plugin_entries(doc)
            if entry.get("name") == NAME]


def _vault_reference(value: Any) -> bool:
    """Does the config hold a Kong vault reference (which only Kong can resolve)?"""
    if isinstance(value, str):
        return value.startswith("{vault://")
    if isinstance(value, dict):
        return any(_vault_reference(v) for v in value.values())
    if isinstance(value, list):
        return any(_vault_reference(v) for v in value)
    return False


def _targets(raw_configs) -> List[Tuple[str, Any, float]]:
    """(IdP identity, store, tombstone lifetime) per distinct store and IdP identity."""
    from ..introspection.config import Config
    from ..introspection.handler import idp_identity
    from ..cache.store import RedisStore

    seen: Dict[Tuple[str, str], Tuple[str, Any, float]] = {}
    for raw in raw_configs:
        conf = Config.parse(raw)
        if not conf.store:
            continue
        static = {n: t.text for n, t in conf.custom_introspection_headers if t.plain}
        ident = (idp_identity(conf, static), json.dumps(conf.store, sort_keys=True, default=str))
        if ident in seen:
            identity, store, lifetime = seen[ident]
            seen[ident] = (identity, store, max(lifetime, tombstone_lifetime(conf)))
        else:
            store = RedisStore.from_config(conf.store, _Quiet())
            if store is not None:
                seen[ident] = (ident[0], store, tombstone_lifetime(conf))
    return list(seen.values())


def purge(store, identity: Optional[str], *, token: Optional[str] = None,
          sub: Optional[str] = None, client_id: Optional[str] = None,
          everything: bool = False,
          lifetime: float = TTL0_TOMBSTONE_LIFETIME) -> Tuple[Dict[str, Any], int]:
    """Purge one store and announce it; returns the message sent and the number of
    cached entries deleted from Redis. Raises on Redis failure.

    The tombstones are written first: a value set again between the delete and
    the announcement is refused already."""
    from ..cache.tokens import TokenCache

    message: Dict[str, Any] = {"v": 1, "op": "purge"}
    if token is not None:
        key = TokenCache(key_material=(identity or "").encode()).key(token)
        message["tombs"] = store.bury(["key:" + key], lifetime)
        removed = store.purge_keys([key])
        message.update(by="key", ids=[key], keys=[])
    elif sub is not None or client_id is not None:
        kind, value = ("sub", sub) if sub is not None else ("client_id", client_id)
        message["tombs"] = store.bury([kind + ":" + store.tag(kind, value)], lifetime)
        tag, keys, removed = store.purge_tag(kind, value)
        message.update(by=kind, ids=[tag], keys=keys)
    elif everything:
        message["tombs"] = store.bury(["all"], lifetime)
        removed = store.purge_all()
        message.update(by="all", ids=[], keys=[])
    else:
        raise ValueError("nothing to purge")
    store.announce(message)
    return message, removed


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) and USAGE_EXIT
    token = args.token
    if args.token_stdin:
        token = sys.stdin.readline().strip()
        if not token:
            print("purge: no token on standard input", file=sys.stderr)
            return USAGE_EXIT
    try:
        configs = _configs(args)
    except Exception as err:  # noqa: BLE001 - its text may hold config secrets
        print("purge: cannot read the configuration (%s)" % type(err).__name__, file=sys.stderr)
        return USAGE_EXIT
    if any(_vault_reference(c) for c in configs):
        # A wrong authorization_value would give other cache keys: a silent miss.
        print("purge: the configuration holds {vault://...} references; give the resolved "
              "values with --config", file=sys.stderr)
        return USAGE_EXIT
    try:
        targets = _targets(configs)
    except Exception as err:  # noqa: BLE001 - its text may hold config secrets
        print("purge: cannot use the configuration (%s)" % type(err).__name__, file=sys.stderr)
        return USAGE_EXIT
    if not targets:
        print("purge: no store.redis in the configuration: nothing is shared; each process "
              "drops its answers after ttl", file=sys.stderr)
        return FAILED_EXIT
    status = 0
    for identity, store, lifetime in targets:
        try:
            message, removed = purge(store, identity, token=token, sub=args.sub,
                                     client_id=args.client_id, everything=args.all,
                                     lifetime=lifetime)
            # In-process copies are dropped on every node by the announcement; the
            # count is what Redis held (0: nothing cached there, which is fine).
            print("purged by %s on %s: %d cached entr%s removed from Redis, every node told"
                  % (message["by"], store.describe, removed, "y" if removed == 1 else "ies"))
        except Exception as err:  # noqa: BLE001 - report, try the other stores
            print("purge: %s failed (%s)" % (store.describe, type(err).__name__), file=sys.stderr)
            status = FAILED_EXIT
        finally:
            store.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
