// A real OpenID Connect provider for labsync's tests and demo: the npm
// package oidc-provider (installed by scripts/install-tools.sh), with
// - machine clients whose access tokens are JWTs for labsync's audience
//   and carry roles as Keycloak does (realm_access.roles);
// - the console's client, `labsync-console` (confidential, authorization
//   code with PKCE), and people who sign in on a login page of its own.
//
//   PORT=4455 JWKS_FILE=keys.json CONSOLE_URLS=http://127.0.0.1:8080 \
//     node devtools/oidc/provider.mjs
//
// JWKS_FILE holds the signing keys (made on first start: one RS256, one
// ES256); a test
// rotates them by writing a new file and starting the provider again.
// CONSOLE_URLS: labsync's base URLs (comma-separated), whose /auth/callback
// and /login are registered for the console's client.
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import { createRequire } from "node:module";

const require = createRequire(process.env.OIDC_PROVIDER_MODULE ?? import.meta.url);
const Provider = (await import(require.resolve("oidc-provider"))).default;

// The port is bound before anything else, so that PORT=0 (any free port,
// which a test uses to never race another process for one) still gives
// the issuer its real port. Its first lines on stdout name the port and
// the issuer.
const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once("error", reject);
  server.listen(Number(process.env.PORT ?? 4455), "127.0.0.1", resolve);
});
// Until the provider is built, a caller that does not wait for the line
// above gets a clear "not yet" rather than a request that hangs.
const notYet = (_req, res) => {
  res.statusCode = 503;
  res.end();
};
server.on("request", notYet);
const port = server.address().port;
const issuer = process.env.ISSUER ?? `http://127.0.0.1:${port}`;
const audience = process.env.AUDIENCE ?? "labsync";
const keysFile = process.env.JWKS_FILE ?? "oidc-keys.json";

function newKey(type, options, alg) {
  const { privateKey } = crypto.generateKeyPairSync(type, options);
  const jwk = privateKey.export({ format: "jwk" });
  return { ...jwk, kid: crypto.randomUUID(), alg, use: "sig" };
}
if (!fs.existsSync(keysFile)) {
  const keys = [newKey("rsa", { modulusLength: 2048 }, "RS256"), newKey("ec", { namedCurve: "P-256" }, "ES256")];
  fs.writeFileSync(keysFile, JSON.stringify({ keys }));
}
const jwks = JSON.parse(fs.readFileSync(keysFile, "utf8"));

// Machine clients, one per role, and two that labsync must refuse.
const roles = {
  "labsync-viewer": ["labsync-viewer"],
  "labsync-operator": ["labsync-operator", "offline_access"],
  "labsync-admin": ["labsync-admin"],
  "labsync-nobody": ["something-else"],
  "other-audience": ["labsync-admin"],
  "short-lived": ["labsync-admin"],
  // Signs its access tokens with the P-256 key (ES256).
  "es256-operator": ["labsync-operator"],
};
const clients = Object.keys(roles).map((id) => ({
  client_id: id,
  client_secret: `${id}-secret`,
  grant_types: ["client_credentials"],
  redirect_uris: [],
  response_types: [],
}));
const consoleUrls = (process.env.CONSOLE_URLS ?? "http://127.0.0.1:8080")
  .split(",")
  .map((u) => u.trim().replace(/\/$/, ""))
  .filter(Boolean);
clients.push({
  client_id: "labsync-console",
  client_secret: "labsync-console-secret",
  grant_types: ["authorization_code"],
  response_types: ["code"],
  redirect_uris: consoleUrls.map((u) => `${u}/auth/callback`),
  post_logout_redirect_uris: consoleUrls.map((u) => `${u}/login`),
  token_endpoint_auth_method: "client_secret_basic",
});

// The people, by login name: each signs in with `<login>-password`. Their
// CML username is their preferred_username.
const people = {
  olivia: { sub: "7f3a9c2e-olivia", name: "Olivia Operator", roles: ["labsync-operator"] },
  // The CML simulator's own non-admin user: the demo's labs are theirs.
  student: { sub: "c41d0b7a-student", name: "Lab Student", roles: ["labsync-self-service"] },
  nobody: { sub: "0a0a0a0a-nobody", name: "No Role", roles: ["something-else"] },
};
const accountOf = (sub) => Object.entries(people).find(([, p]) => p.sub === sub);

const page = (title, body) => `<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>${title}</title></head><body><main><h1>${title}</h1>${body}</main></body></html>`;
const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const provider = new Provider(issuer, {
  clients,
  jwks,
  // Every scope's claims in the ID token too, as a provider configured to
  // put roles there does; with ID_TOKEN_CLAIMS=minimal, only in userinfo,
  // as Keycloak's default mappers do with realm roles.
  conformIdTokenClaims: process.env.ID_TOKEN_CLAIMS === "minimal",
  // PKCE for every client, confidential ones too: a sign-in without it fails.
  pkce: { required: () => true },
  claims: {
    openid: ["sub"],
    profile: ["preferred_username", "name", "realm_access"],
    email: ["email", "email_verified"],
  },
  async findAccount(ctx, sub) {
    const found = accountOf(sub);
    if (!found) return undefined;
    const [login, p] = found;
    return {
      accountId: sub,
      async claims() {
        return {
          sub,
          preferred_username: login,
          name: p.name,
          email: `${login}@example.net`,
          email_verified: true,
          realm_access: { roles: p.roles },
        };
      },
    };
  },
  // The console is this organisation's own application: no consent page.
  async loadExistingGrant(ctx) {
    const existing = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (existing) return ctx.oidc.provider.Grant.find(existing);
    if (ctx.oidc.client.clientId !== "labsync-console") return undefined;
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope("openid profile email");
    await grant.save();
    return grant;
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: {
      enabled: true,
      logoutSource: async (ctx, form) => {
        ctx.body = page("Sign out of the provider?", `${form}<button id="sign-out" type="submit" form="op.logoutForm" value="yes" name="logout">Yes, sign me out</button>`);
      },
    },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // The console's access token is for the provider's own userinfo.
      defaultResource: (ctx, client) =>
        client.clientId === "labsync-console" ? undefined : client.clientId === "other-audience" ? "urn:other" : `urn:${audience}`,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource, client) => ({
        scope: "api",
        audience: resource === `urn:${audience}` ? audience : resource,
        accessTokenTTL: client.clientId === "short-lived" ? 1 : 300,
        accessTokenFormat: "jwt",
        jwt: { sign: { alg: client.clientId === "es256-operator" ? "ES256" : "RS256" } },
      }),
    },
  },
  extraTokenClaims: (ctx, token) => ({
    realm_access: { roles: roles[token.clientId] ?? [] },
    preferred_username: token.clientId,
  }),
});
// How often the key set was read, for the tests that bound it.
let keySetReads = 0;
// The login page: a form, checked against the people above.
const loginForm = (uid, error) =>
  page(
    "Sign in to the labsync demo provider",
    `${error ? `<p role="alert">${escape(error)}</p>` : ""}
<form method="post" action="/interaction/${escape(uid)}/login">
<label>Username <input id="username" name="login" autocomplete="username" required autofocus></label>
<label>Password <input id="password" name="password" type="password" autocomplete="current-password" required></label>
<button id="submit" type="submit">Sign in</button></form>`,
  );
const formOf = async (ctx) => {
  let raw = "";
  for await (const chunk of ctx.req) {
    raw += chunk;
    if (raw.length > 4096) break;
  }
  return new URLSearchParams(raw);
};
provider.use(async (ctx, next) => {
  const m = ctx.path.match(/^\/interaction\/([\w-]+)(\/login)?$/);
  if (m) {
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    ctx.type = "html";
    if (!m[2]) {
      ctx.body = loginForm(details.uid);
      return;
    }
    const form = await formOf(ctx);
    const login = form.get("login") ?? "";
    const person = people[login];
    if (!person || form.get("password") !== `${login}-password`) {
      ctx.status = 401;
      ctx.body = loginForm(details.uid, "Unknown username or wrong password.");
      return;
    }
    await provider.interactionFinished(ctx.req, ctx.res, { login: { accountId: person.sub } }, { mergeWithLastSubmission: false });
    return;
  }
  if (ctx.path === "/test/key-set-reads") {
    ctx.body = { reads: keySetReads };
    return;
  }
  if (ctx.path === "/jwks") keySetReads += 1;
  await next();
});
server.off("request", notYet);
server.on("request", provider.callback());
console.log(`oidc-provider port ${port}`);
console.log(`oidc-provider listening on ${issuer}`);
