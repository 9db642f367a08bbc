#!/usr/bin/env bash
# Try the running compose stack (docker/docker-compose.yml): get tokens from
# Keycloak with client credentials and call the echo service through Kong.
#
#   docker compose -f docker/docker-compose.yml up -d --build
#   bash docker/try.sh            # the plugin's answers
#   bash docker/try.sh --guard    # also: kill the plugin server, see the guard's 503
#
# Needs curl. The compose project is COMPOSE_PROJECT_NAME (as docker compose
# reads it) when set. Ports follow the compose file's variables (KONG_PROXY_PORT,
# KEYCLOAK_PORT). Exits non-zero at the first answer that is not the expected one.
set -euo pipefail
cd "$(dirname "$0")"

KONG="http://127.0.0.1:${KONG_PROXY_PORT:-8000}"
KEYCLOAK="http://127.0.0.1:${KEYCLOAK_PORT:-8080}"
TOKEN_URL="$KEYCLOAK/realms/kong/protocol/openid-connect/token"
COMPOSE=(docker compose -f docker-compose.yml)
# Test-only client secrets of keycloak/realm.json.
declare -A SECRETS=([alice-app]=alice-secret [bob-app]=bob-secret)

token() {  # client_id -> access token (client credentials grant)
  curl -fsS -u "$1:${SECRETS[$1]}" -d grant_type=client_credentials "$TOKEN_URL" |
    sed -n 's/.*"access_token": *"\([^"]*\)".*/\1/p'
}

# call EXPECTED_STATUS PATH [curl args...]: print the status and the identity
# headers the upstream received (the echo answers with the request it got).
call() {
  local expected=$1 path=$2 body status
  shift 2
  body=$(mktemp)
  status=$(curl -sS -o "$body" -w '%{http_code}' "$@" "$KONG$path")
  echo "GET $path -> $status"
  if [ "$status" = 200 ]; then
    grep -o '"x-\(consumer\|credential\|anonymous\)[^"]*": *"[^"]*"' "$body" | sed 's/^/    /' || true
  else
    sed 's/^/    /' "$body"; echo
  fi
  rm -f "$body"
  if [ "$status" != "$expected" ]; then
    echo "expected $expected" >&2
    exit 1
  fi
}

echo "== No token: the plugin refuses (RFC 6750)"
call 401 /echo

echo "== A garbage token: Keycloak says inactive"
call 401 /echo -H "Authorization: Bearer not-a-real-token"

echo "== alice-app's token on /echo (consumer_by=username -> consumer alice)"
call 200 /echo -H "Authorization: Bearer $(token alice-app)"

echo "== bob-app's token on /client-echo (consumer_by=client_id -> custom_id bob-app)"
call 200 /client-echo -H "Authorization: Bearer $(token bob-app)"

echo "== Spoofed identity headers with no token: still refused, never forwarded"
call 401 /echo -H "X-Consumer-Username: mallory" -H "X-Consumer-ID: evil"

if [ "${1:-}" = "--guard" ]; then
  # Kill the plugin server (Kong restarts it within about a second) and ask at
  # once: Kong OSS would pass the request on unauthenticated; the post-function
  # guard of kong.yml answers 503 instead.
  echo "== Plugin server killed: the guard answers 503, nothing reaches the echo"
  for _ in $(seq 1 20); do
    "${COMPOSE[@]}" exec -T kong /opt/kong-oauth2-introspection/bin/python -c '
import os, signal
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\0")
    except OSError:
        continue
    if b"serve" in argv and any(a.endswith(b"/kong-oauth2-introspection") for a in argv):
        os.kill(int(pid), signal.SIGKILL)'
    status=$(curl -sS -o /dev/null -w '%{http_code}' -H "X-Consumer-ID: evil" "$KONG/echo")
    echo "    no token, server just killed -> $status"
    if [ "$status" = 200 ]; then echo "the request reached the upstream" >&2; exit 1; fi
    if [ "$status" = 503 ]; then break; fi
  done
  [ "$status" = 503 ] || { echo "never caught the server down (last $status)" >&2; exit 1; }
fi
echo "OK"
