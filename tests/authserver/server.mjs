// Test authorization server for the oauth2-introspection plugin.
//
// Runs oidc-provider (a certified OpenID Connect / OAuth 2.0 server) on
// 127.0.0.1 with only what the plugin's tests need: the client_credentials
// grant, RFC 7662 introspection and RFC 7009 revocation, opaque access tokens
// (or, per client, JWT access tokens with the server's JWKS at /jwks).
//
// Usage:  node server.mjs --config clients.json
//         (or AUTHSERVER_CONFIG=clients.json node server.mjs)
//
// Config file (JSON):
//   {
//     "host": "127.0.0.1",          optional, only loopback addresses accepted
//     "port": 0,                    optional, 0 = let the OS choose
//     "default_ttl": 600,           optional, access token lifetime in seconds
//     "scopes": ["extra"],          optional, scopes known besides the clients' ones
//     "clients": [{
//       "client_id": "kong",
//       "client_secret": "s3cret",
//       "scope": "read write",      string or list: scopes the client may request
//       "introspector": true,       may introspect and revoke other clients' tokens
//       "claims": {"username": "alice", "user": {"name": "..."}},
//                                   extra members of this client's tokens'
//                                   introspection answers
//       "ttl": 600,                 optional per-client token lifetime (seconds)
//       "audience": "https://api.example" | ["https://a", "https://b"],
//                                   optional; the first is the default "aud"
//       "token_endpoint_auth_method": "client_secret_basic"   optional
//       "access_token_format": "jwt",   optional; tokens for its audiences are
//                                   then JWTs (RFC 9068) signed with "jwt_alg"
//       "jwt_alg": "ES256" | "RS256"    optional, default ES256
//       "jwks": {"keys": [...]},    optional public keys (private_key_jwt)
//       "introspection_signed_response_alg": "ES256"   optional: RFC 9701 signed
//                                   answers when asked with Accept:
//                                   application/token-introspection+jwt
//       "tls_client_certificate_bound_access_tokens": true   optional (with
//                                   "tls"): tokens bound to the client certificate
//       "tls_client_auth_subject_dn": "CN=name"   optional (tls_client_auth:
//                                   the client certificate's CN must match)
//     }],
//     "tls": {"cert": PEM, "key": PEM, "ca": PEM}   optional: serve HTTPS,
//                                   ask for client certificates (verified
//                                   against "ca") and offer tls_client_auth
//   }
//
// POST /introspection-bearer is RFC 7662 introspection for a caller holding an
// access token (Authorization: Bearer, issued by this server to an introspector
// client) instead of client credentials: oidc-provider checks the token, then
// answers as its own introspection endpoint for that client. Gateways call this
// "pre-authorization".
//
// A token request may carry the header "X-Test-Token-TTL: <seconds>" to get a
// token with that lifetime (tests of expiry).
//
// When listening it prints "READY <port>" on stdout. It exits when stdin is
// closed (the parent went away) or on SIGTERM / SIGINT.

import { X509Certificate, generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createServer as createTLSServer } from 'node:https';
import process from 'node:process';

import Provider, { errors } from 'oidc-provider';

const TTL_HEADER = 'x-test-token-ttl';
const LOOPBACK = new Set(['127.0.0.1', '::1', 'localhost']);

function fail(message) {
  process.stderr.write(`authserver: ${message}\n`);
  process.exit(2);
}

function readConfig() {
  const args = process.argv.slice(2);
  let path = process.env.AUTHSERVER_CONFIG;
  for (let i = 0; i < args.length; i += 1) {
    if (args[i] === '--config') path = args[i + 1];
    else if (args[i].startsWith('--config=')) path = args[i].slice('--config='.length);
  }
  if (!path) fail('no configuration: pass --config FILE or set AUTHSERVER_CONFIG');
  try {
    return JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    return fail(`cannot read configuration ${path}: ${err.message}`);
  }
}

const asList = (value) => {
  if (value === undefined || value === null) return [];
  if (Array.isArray(value)) return value.map(String);
  return String(value).split(' ').filter(Boolean);
};

function positiveSeconds(value, what) {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) fail(`${what} must be a positive integer, got ${JSON.stringify(value)}`);
  return n;
}

const config = readConfig();
const host = config.host ?? '127.0.0.1';
if (!LOOPBACK.has(host)) fail(`refusing to listen on ${host}: loopback only`);
const defaultTTL = positiveSeconds(config.default_ttl ?? 600, 'default_ttl');

// Per-client settings kept outside oidc-provider's client metadata.
const settings = new Map();
const allScopes = new Set(asList(config.scopes));
const clients = [];

for (const c of config.clients ?? []) {
  if (!c.client_id || !c.client_secret) fail('every client needs client_id and client_secret');
  if (settings.has(c.client_id)) fail(`duplicate client ${c.client_id}`);
  const scopes = asList(c.scope);
  scopes.forEach((s) => allScopes.add(s));
  const claims = c.claims ?? {};
  if (claims === null || typeof claims !== 'object' || Array.isArray(claims)) {
    fail(`claims of ${c.client_id} must be an object`);
  }
  settings.set(c.client_id, {
    introspector: Boolean(c.introspector),
    claims,
    ttl: c.ttl === undefined || c.ttl === null ? undefined : positiveSeconds(c.ttl, `ttl of ${c.client_id}`),
    audiences: asList(c.audience),
    scope: scopes.join(' '),
    jwt: c.access_token_format === 'jwt',
    jwtAlg: c.jwt_alg ?? 'ES256',
  });
  if (c.access_token_format === 'jwt' && !asList(c.audience).length) {
    fail(`${c.client_id}: JWT access tokens need an audience`);
  }
  if (!['ES256', 'RS256'].includes(c.jwt_alg ?? 'ES256')) fail(`${c.client_id}: jwt_alg must be ES256 or RS256`);
  clients.push({
    client_id: String(c.client_id),
    client_secret: String(c.client_secret),
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: c.token_endpoint_auth_method ?? 'client_secret_basic',
    ...(scopes.length ? { scope: scopes.join(' ') } : {}),
    ...(c.jwks ? { jwks: c.jwks } : {}),
    ...(c.tls_client_certificate_bound_access_tokens
      ? { tls_client_certificate_bound_access_tokens: true } : {}),
    ...(c.introspection_signed_response_alg
      ? { introspection_signed_response_alg: c.introspection_signed_response_alg } : {}),
    ...(c.tls_client_auth_subject_dn ? { tls_client_auth_subject_dn: c.tls_client_auth_subject_dn } : {}),
  });
}

// Storage: a plain in-memory store. oidc-provider's bundled development
// adapter is an LRU capped at 1000 entries, which would silently "revoke"
// tokens in a long test session.
const stores = new Map();

class MemoryAdapter {
  constructor(model) {
    if (!stores.has(model)) stores.set(model, new Map());
    this.entries = stores.get(model);
  }

  live(id) {
    const entry = this.entries.get(id);
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      this.entries.delete(id);
      return undefined;
    }
    return entry;
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = expiresIn ? Date.now() + expiresIn * 1000 : Infinity;
    this.entries.set(id, { payload: structuredClone(payload), expiresAt });
  }

  async find(id) {
    const entry = this.live(id);
    return entry ? structuredClone(entry.payload) : undefined;
  }

  async findBy(field, value) {
    for (const id of this.entries.keys()) {
      const entry = this.live(id);
      if (entry && entry.payload[field] === value) return structuredClone(entry.payload);
    }
    return undefined;
  }

  findByUid(uid) { return this.findBy('uid', uid); }

  findByUserCode(userCode) { return this.findBy('userCode', userCode); }

  async consume(id) {
    const entry = this.live(id);
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    this.entries.delete(id);
  }

  async revokeByGrantId(grantId) {
    for (const [id, entry] of this.entries) {
      if (entry.payload.grantId === grantId) this.entries.delete(id);
    }
  }
}

setInterval(() => {
  const now = Date.now();
  for (const entries of stores.values()) {
    for (const [id, entry] of entries) if (entry.expiresAt <= now) entries.delete(id);
  }
}, 30_000).unref();

// Throw-away signing keys, new at every start: the key ids change too, so a
// restart on the same port is a key rotation. They sign JWT access tokens of
// clients with "access_token_format": "jwt". Providing them avoids the
// provider's well-known development keys.
//
// The keys are asked for as JWKs from the key generation itself, never as
// KeyObjects exported afterwards: on Node 20, keyObject.export({format:'jwk'})
// holds the key's mutex while it allocates, and a garbage collection there that
// frees the finished (now unreachable) generation job, whose destructor takes
// the same mutex, deadlocks the main thread for good, before "READY" (about 1
// start in 100, more often under load).
function newJWK(type, options) {
  const jwk = { format: 'jwk' };
  return generateKeyPairSync(type, { ...options, publicKeyEncoding: jwk, privateKeyEncoding: jwk })
    .privateKey;
}
const startId = randomBytes(4).toString('hex');
const signingKey = {
  ...newJWK('ec', { namedCurve: 'P-256' }), alg: 'ES256', use: 'sig', kid: `es256-${startId}`,
};
const rsaSigningKey = {
  ...newJWK('rsa', { modulusLength: 2048 }), alg: 'RS256', use: 'sig', kid: `rs256-${startId}`,
};

function tokenTTL(ctx, token, client) {
  const requested = ctx?.get?.(TTL_HEADER);
  if (requested) {
    const n = Number(requested);
    if (Number.isInteger(n) && n > 0) return n;
    throw new errors.InvalidRequest(`${TTL_HEADER} must be a positive integer`);
  }
  const own = settings.get(client?.clientId ?? token.clientId)?.ttl;
  return own ?? token.resourceServer?.accessTokenTTL ?? defaultTTL;
}

function isIntrospector(client) {
  return client.clientAuthMethod !== 'none' && settings.get(client.clientId)?.introspector === true;
}

const providerConfiguration = {
  adapter: MemoryAdapter,
  clients,
  scopes: [...allScopes],
  jwks: { keys: [signingKey, rsaSigningKey] },
  idTokenSigningAlgValues: ['ES256'],
  clientDefaults: {
    grant_types: ['client_credentials'],
    response_types: [],
    id_token_signed_response_alg: 'ES256',
  },
  cookies: { keys: ['authserver-test-cookie-key'] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    // RFC 9701: only for clients with introspection_signed_response_alg that ask for it.
    jwtIntrospection: { enabled: true },
    introspection: {
      enabled: true,
      // A client may introspect its own tokens; an introspector (the
      // resource server, e.g. Kong) may introspect anybody's.
      allowedPolicy: async (ctx, client, token) => (
        token.clientId === client.clientId || isIntrospector(client)
      ),
    },
    revocation: {
      enabled: true,
      allowedPolicy: async (ctx, client, token) => {
        if (token.clientId === client.clientId || isIntrospector(client)) return true;
        throw new errors.InvalidRequest('client is not authorized to revoke the presented token');
      },
    },
    // Only used for clients configured with an "audience": the token then
    // carries "aud". Tokens stay opaque unless the client asks for JWTs.
    resourceIndicators: {
      enabled: true,
      defaultResource: async (ctx, client, oneOf) => {
        if (oneOf) return oneOf;
        return settings.get(client.clientId)?.audiences[0];
      },
      getResourceServerInfo: async (ctx, resource, client) => {
        const own = settings.get(client.clientId);
        if (!own || !own.audiences.includes(resource)) {
          throw new errors.InvalidTarget(`${resource} is not an audience of ${client.clientId}`);
        }
        if (own.jwt) {
          return {
            scope: own.scope, audience: resource, accessTokenFormat: 'jwt',
            jwt: { sign: { alg: own.jwtAlg } },
          };
        }
        return { scope: own.scope, audience: resource, accessTokenFormat: 'opaque' };
      },
    },
  },
  ttl: {
    ClientCredentials: tokenTTL,
  },
  // Extra members of the introspection answer, per client. oidc-provider
  // stores them with the token and spreads them into the RFC 7662 answer
  // (the standard members it sets itself always win).
  extraTokenClaims: async (ctx, token) => {
    const claims = settings.get(token.clientId)?.claims;
    return claims && Object.keys(claims).length ? structuredClone(claims) : undefined;
  },
};

// Client authentication by certificate (RFC 8705), only when serving HTTPS.
if (config.tls) {
  providerConfiguration.clientAuthMethods = [
    'client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt',
    'none', 'tls_client_auth',
  ];
  providerConfiguration.features.mTLS = {
    enabled: true,
    tlsClientAuth: true,
    // RFC 8705 section 3: clients registered for it get tokens bound to the
    // certificate they presented at the token endpoint (cnf.x5t#S256).
    certificateBoundAccessTokens: true,
    getCertificate: (ctx) => {
      const peer = ctx.socket.getPeerCertificate?.();
      return peer?.raw ? new X509Certificate(peer.raw).toString() : undefined;
    },
    certificateAuthorized: (ctx) => ctx.socket.authorized === true,
    certificateSubjectMatches: (ctx, property, expected) => (
      property === 'tls_client_auth_subject_dn'
      && expected === `CN=${ctx.socket.getPeerCertificate?.()?.subject?.CN}`),
  };
}

let provider;
let handler = (req, res) => {
  res.statusCode = 503;
  res.end();
};

const secrets = new Map(clients.map((c) => [c.client_id, c.client_secret]));

async function bearerIntrospection(req, res) {
  const [scheme, value] = (req.headers.authorization ?? '').split(' ');
  const token = scheme?.toLowerCase() === 'bearer' && value
    ? await provider.ClientCredentials.find(value) : undefined;
  if (!token || token.isExpired || settings.get(token.clientId)?.introspector !== true) {
    res.statusCode = 401;
    res.setHeader('WWW-Authenticate', 'Bearer error="invalid_token"');
    res.end();
    return;
  }
  const basic = `${encodeURIComponent(token.clientId)}:${encodeURIComponent(secrets.get(token.clientId))}`;
  req.headers.authorization = `Basic ${Buffer.from(basic).toString('base64')}`;
  req.url = '/token/introspection';
  handler(req, res);
}

function route(req, res) {
  if (req.method === 'POST' && req.url === '/introspection-bearer' && provider) {
    bearerIntrospection(req, res).catch((err) => {
      process.stderr.write(`authserver: introspection-bearer: ${err.stack ?? err}\n`);
      res.statusCode = 500;
      res.end();
    });
    return;
  }
  handler(req, res);
}

const server = config.tls
  ? createTLSServer({
    cert: config.tls.cert, key: config.tls.key, ca: config.tls.ca,
    requestCert: true, rejectUnauthorized: false,
  }, route)
  : createServer(route);

server.on('error', (err) => fail(`cannot listen: ${err.message}`));

server.listen(Number(config.port ?? 0), host, () => {
  const { port } = server.address();
  const scheme = config.tls ? 'https' : 'http';
  const issuer = `${scheme}://${host.includes(':') ? `[${host}]` : host}:${port}`;
  try {
    provider = new Provider(issuer, providerConfiguration);
  } catch (err) {
    fail(`invalid provider configuration: ${err.stack ?? err}`);
  }
  provider.on('server_error', (ctx, err) => {
    process.stderr.write(`authserver: server_error: ${err.stack ?? err}\n`);
  });
  handler = provider.callback();
  process.stdout.write(`READY ${port}\n`);
});

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  server.close(() => process.exit(0));
  server.closeAllConnections?.();
  setTimeout(() => process.exit(0), 1000).unref();
}

process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.on('end', stop);
process.stdin.on('close', stop);
process.stdin.on('error', stop);
process.stdin.resume();
