// A real OpenID Connect provider for labsync's tests and demo: the npm
// package oidc-provider (installed by scripts/install-tools.sh), with
// clients whose access tokens are JWTs for labsync's audience and carry
// roles as Keycloak does (realm_access.roles).
//
//   PORT=4455 JWKS_FILE=keys.json node devtools/oidc/provider.mjs
//
// JWKS_FILE holds the signing keys (made, RS256, on first start); a test
// rotates them by writing a new file and starting the provider again.
import crypto from "node:crypto";
import fs from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(process.env.OIDC_PROVIDER_MODULE ?? import.meta.url);
const Provider = (await import(require.resolve("oidc-provider"))).default;

const port = Number(process.env.PORT ?? 4455);
const issuer = process.env.ISSUER ?? `http://127.0.0.1:${port}`;
const audience = process.env.AUDIENCE ?? "labsync";
const keysFile = process.env.JWKS_FILE ?? "oidc-keys.json";

function newKey() {
  const { privateKey } = crypto.generateKeyPairSync("rsa", { modulusLength: 2048 });
  const jwk = privateKey.export({ format: "jwk" });
  return { ...jwk, kid: crypto.randomUUID(), alg: "RS256", use: "sig" };
}
if (!fs.existsSync(keysFile)) {
  fs.writeFileSync(keysFile, JSON.stringify({ keys: [newKey()] }));
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
};
const clients = Object.keys(roles).map((id) => ({
  client_id: id,
  client_secret: `${id}-secret`,
  grant_types: ["client_credentials"],
  redirect_uris: [],
  response_types: [],
}));

const provider = new Provider(issuer, {
  clients,
  jwks,
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (ctx, client) => (client.clientId === "other-audience" ? "urn:other" : `urn:${audience}`),
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource, client) => ({
        scope: "api",
        audience: resource === `urn:${audience}` ? audience : resource,
        accessTokenTTL: client.clientId === "short-lived" ? 1 : 300,
        accessTokenFormat: "jwt",
        jwt: { sign: { alg: "RS256" } },
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
provider.use(async (ctx, next) => {
  if (ctx.path === "/test/key-set-reads") {
    ctx.body = { reads: keySetReads };
    return;
  }
  if (ctx.path === "/jwks") keySetReads += 1;
  await next();
});
provider.listen(port, "127.0.0.1", () => {
  console.log(`oidc-provider listening on ${issuer}`);
});
