// The dev identity provider: a real OpenID Provider (panva's oidc-provider) so `make run` shows
// agentid's console sign-in, and the step-up's fresh login, in a browser. DEV ONLY: the users,
// their passwords and one-time codes are files `agentid dev init` wrote under var/dev/.
//
//   node devidp/server.mjs <config.json>
//
// The config (written by `agentid dev init`, or by the tests into their tmp_path) names the
// issuer and port, the signing key (the dev IdP's PEM, so `agentid dev user-token` and this
// provider sign with the same key under the same issuer), the users file, the clients and the
// resource agentid is. Access tokens for that resource are JWTs (RFC 9068) with the claims
// agentid reads: `scope` (the user's grantable scopes), `auth_time`, `acr`.

import { createPrivateKey, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';

import Provider, { errors, interactionPolicy } from 'oidc-provider';

const MFA = 'urn:mfa'; // password and the one-time code
const PASSWORD_ONLY = 'urn:pwd';
const MAX_FORM_BYTES = 8192;

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const users = JSON.parse(readFileSync(config.users_file, 'utf8')).users;
const signingKey = {
  ...createPrivateKey(readFileSync(config.signing_key.pem_file)).export({ format: 'jwk' }),
  kid: config.signing_key.kid,
  alg: 'RS256',
  use: 'sig',
};

function clientMetadata(client) {
  const metadata = {
    client_id: client.client_id,
    redirect_uris: client.redirect_uris,
    application_type: client.application_type ?? 'web',
    grant_types: ['authorization_code'],
    response_types: ['code'],
    require_auth_time: true,
    token_endpoint_auth_method: client.client_secret_file ? 'client_secret_basic' : 'none',
  };
  if (client.client_secret_file) {
    metadata.client_secret = readFileSync(client.client_secret_file, 'utf8').trim();
  }
  return metadata;
}

// Login is asked again when the requested acr_values cannot be met by the session's acr
// (RFC 9470: the step-up's "acr_values"); max_age and prompt=login are the provider's own.
const policy = interactionPolicy.base();
policy.get('login').checks.add(
  new interactionPolicy.Check('acr_values', 'the requested acr is not met', (ctx) => {
    const wanted = (ctx.oidc.params.acr_values ?? '').split(' ').filter(Boolean);
    if (wanted.length === 0 || wanted.includes(ctx.oidc.acr)) {
      return interactionPolicy.Check.NO_NEED_TO_PROMPT;
    }
    return interactionPolicy.Check.REQUEST_PROMPT;
  }),
);

const provider = new Provider(config.issuer, {
  clients: config.clients.map(clientMetadata),
  jwks: { keys: [signingKey] },
  cookies: { keys: config.cookie_keys },
  acrValues: [PASSWORD_ONLY, MFA],
  claims: { openid: ['sub'], profile: ['name'] },
  pkce: { required: () => true },
  interactions: { policy, url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  features: {
    devInteractions: { enabled: false },
    userinfo: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // Without a `resource` parameter the token is for agentid: its console need not send one.
      defaultResource: () => config.resource,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, indicator) => {
        if (indicator !== config.resource) throw new errors.InvalidTarget();
        return {
          scope: 'agentid',
          audience: config.audience,
          accessTokenTTL: config.access_token_ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  formats: {
    customizers: {
      // What agentid reads of a user's token: the scopes they may grant, when and how they
      // signed in (the code's or refresh token's record of the login).
      jwt: (ctx, token, jwt) => {
        const user = users[token.accountId];
        jwt.payload.scope = user ? user.scope : '';
        const login = ctx.oidc.entities.AuthorizationCode ?? ctx.oidc.entities.RefreshToken;
        if (login?.authTime) jwt.payload.auth_time = login.authTime;
        if (login?.acr) jwt.payload.acr = login.acr;
      },
    },
  },
  findAccount: (ctx, sub) =>
    users[sub] ? { accountId: sub, claims: () => ({ sub, name: sub }) } : undefined,
  ttl: {
    AccessToken: config.access_token_ttl,
    AuthorizationCode: 60,
    IdToken: 600,
    Interaction: 600,
    Session: config.session_ttl ?? 8 * 3600,
    Grant: config.session_ttl ?? 8 * 3600,
  },
  renderError: (ctx, out) => {
    ctx.type = 'html';
    ctx.body = page('Sign-in error', `<p>${escape(out.error)}: ${escape(out.error_description ?? '')}</p>`);
  },
});

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function page(title, body) {
  return `<!doctype html><html><head><meta charset="utf-8"><title>${escape(title)}</title></head>
<body><p><strong>agentid dev IdP: for development only.</strong></p><h1>${escape(title)}</h1>
${body}</body></html>`;
}

function loginPage(uid, details, problem) {
  const wanted = (details.params.acr_values ?? '').split(' ');
  const code = wanted.includes(MFA)
    ? '<p><label>One-time code <input name="code" autocomplete="one-time-code"></label></p>'
    : '';
  const hint = details.params.login_hint ? escape(details.params.login_hint) : '';
  return page(
    'Sign in',
    `${problem ? `<p role="alert">${escape(problem)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}/login">
<p><label>User <input name="login" value="${hint}" autofocus></label></p>
<p><label>Password <input name="password" type="password"></label></p>
${code}<p><button type="submit">Sign in</button></p></form>
<p>The dev users and their passwords: <code>agentid dev users</code>.</p>`,
  );
}

function same(given, expected) {
  const a = Buffer.from(String(given ?? ''));
  const b = Buffer.from(String(expected ?? ''));
  return a.length === b.length && b.length > 0 && timingSafeEqual(a, b);
}

async function readForm(req) {
  let size = 0;
  const chunks = [];
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_FORM_BYTES) throw new errors.InvalidRequest('the form is too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function send(res, status, html) {
  res.writeHead(status, {
    'content-type': 'text/html; charset=utf-8',
    'cache-control': 'no-store',
  });
  res.end(html);
}

// The first-party clients (agentid's console, its CLI) are consented to without asking.
async function consent(req, res, details) {
  const { Grant } = provider;
  const grant = details.grantId
    ? await Grant.find(details.grantId)
    : new Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
  const missing = details.prompt.details;
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { consent: { grantId } }, {
    mergeWithLastSubmission: true,
  });
}

async function login(req, res, uid, details) {
  const form = await readForm(req);
  const name = form.get('login') ?? '';
  const user = Object.hasOwn(users, name) ? users[name] : undefined;
  if (!user || !same(form.get('password'), user.password)) {
    send(res, 401, loginPage(uid, details, 'Unknown user or wrong password.'));
    return;
  }
  const wanted = (details.params.acr_values ?? '').split(' ');
  const code = form.get('code');
  if (wanted.includes(MFA) && !same(code, user.code)) {
    send(res, 401, loginPage(uid, details, 'The one-time code is wrong.'));
    return;
  }
  const mfa = same(code, user.code);
  const result = {
    login: {
      accountId: name,
      acr: mfa ? MFA : PASSWORD_ONLY,
      amr: mfa ? ['pwd', 'otp'] : ['pwd'],
    },
  };
  await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
}

async function interaction(req, res) {
  const url = new URL(req.url, config.issuer);
  const match = /^\/interaction\/([\w-]+)(\/login)?$/.exec(url.pathname);
  if (!match) return false;
  const [, uid, action] = match;
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new errors.InvalidRequest('interaction mismatch');
  if (req.method === 'GET' && !action) {
    if (details.prompt.name === 'consent') await consent(req, res, details);
    else send(res, 200, loginPage(uid, details));
    return true;
  }
  if (req.method === 'POST' && action) {
    await login(req, res, uid, details);
    return true;
  }
  send(res, 405, page('Not allowed', '<p>Method not allowed.</p>'));
  return true;
}

const callback = provider.callback();
const server = createServer(async (req, res) => {
  try {
    if (await interaction(req, res)) return;
  } catch (error) {
    send(res, 400, page('Sign-in error', `<p>${escape(error.error_description ?? error.message)}</p>`));
    return;
  }
  callback(req, res);
});

server.listen(config.port, config.host ?? '127.0.0.1', () => {
  // The tests and scripts/run-dev wait for this line.
  console.log(`devidp ready on ${config.issuer} (dev only; users: ${Object.keys(users).join(', ')})`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
