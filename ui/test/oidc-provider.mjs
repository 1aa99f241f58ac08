// A real OpenID provider for the tests (the npm package oidc-provider): one confidential
// client, accounts made on the fly (the login is the email, verified unless it starts
// with "unverified"), its development login and consent pages.
// Usage: node test/oidc-provider.mjs PORT REDIRECT_URI  (prints "ready" when it listens)
import Provider from "oidc-provider";

const [port, redirect] = process.argv.slice(2);
const provider = new Provider(`http://127.0.0.1:${port}`, {
  clients: [{ client_id: "hearth", client_secret: "hearth-test-secret", redirect_uris: [redirect], response_types: ["code"], grant_types: ["authorization_code"] }],
  claims: { openid: ["sub"], email: ["email", "email_verified"] },
  pkce: { required: () => true },
  findAccount: async (_ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id, email: id, email_verified: !id.startsWith("unverified") }),
  }),
  features: { devInteractions: { enabled: true } },
  cookies: { keys: ["a test key for the provider's cookies"] },
});
provider.proxy = false;
provider.listen(Number(port), "127.0.0.1", () => console.log("ready"));
