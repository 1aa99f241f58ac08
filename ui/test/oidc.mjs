// OpenID Connect sign-in in headless Chromium against a real provider (test/oidc-provider.mjs):
// a refused state, a refused unverified email, then a sign-in that makes the user.
// Run by crates/hearth/tests/ui.rs with HEARTH_URL and SCREENSHOTS set.
import { chromium } from "playwright-core";

const base = process.env.HEARTH_URL;
const shots = process.env.SCREENSHOTS ?? "screenshots";
const step = (what) => console.log(`oidc: ${what}`);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: ["--no-sandbox"] });

async function atProvider(page, login) {
  // oidc-provider's development pages: a login form, then consent.
  await page.locator("input[name=login]").fill(login);
  await page.locator("input[name=password]").fill("anything");
  await page.locator("button[type=submit]").click();
  await page.locator("button[type=submit]").filter({ hasText: /continue|authorize/i }).click();
}

try {
  const page = await browser.newPage();
  step("a callback whose state is not the one this browser started with");
  await page.goto(`${base}/v1/auth/oidc/start`);
  await page.locator("input[name=login]").waitFor();
  await page.goto(`${base}/v1/auth/oidc/callback?code=stolen&state=not-mine`);
  await page.getByRole("alert").filter({ hasText: "state does not match" }).waitFor();

  step("an email the provider has not verified");
  await page.getByRole("link", { name: "Sign in with Test provider" }).click();
  await atProvider(page, "unverified@example.com");
  await page.getByRole("alert").filter({ hasText: "not verified" }).waitFor();

  step("a verified email: the user is made and signed in");
  // Another browser: the provider remembers who signed in with it in this one.
  const other = await (await browser.newContext()).newPage();
  await other.goto(base);
  await other.getByRole("link", { name: "Sign in with Test provider" }).click();
  await atProvider(other, "oidc@example.com");
  await other.getByText("oidc@example.com").waitFor();
  await other.getByRole("button", { name: "Provision my VM" }).waitFor();
  await other.screenshot({ path: `${shots}/oidc-signed-in.png`, fullPage: true });
  step("done");
} finally {
  await browser.close();
}
