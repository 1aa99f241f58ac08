// The UI end to end in headless Chromium (Debian's `chromium`, driven by playwright-core):
// set a password from an invitation link, sign in with it, provision the personal VM, watch log lines arrive and the state
// turn `running` without a reload, run `echo ok` in the terminal; make an API token on the settings page, use it with curl,
// revoke it; be refused the admin page; stop, destroy; then an admin destroys the user's next
// VM from the admin page and the user's page follows. Saves a
// screenshot of each page at desktop and phone width into $SCREENSHOTS, each page checked by
// axe-core first (no serious or critical violation).
//
// The personal VM gets the user's SSH key (SSH_PUBLIC_KEY), and real OpenSSH logs in with
// SSH_KEY_FILE using the line the page shows. The environment list follows a stop made with
// curl without a reload; the admin sees the last day's chart and sets a user's quota.
//
// Run by crates/hearth/tests/ui.rs with HEARTH_URL, LINK and ADMIN_LINK (invitations), EMAIL,
// ADMIN_EMAIL, PASSWORD, SSH_PUBLIC_KEY, SSH_KEY_FILE, HOST_NAME and SCREENSHOTS set.
import { chromium } from "playwright-core";
import { mkdirSync, readFileSync } from "node:fs";
import { execFileSync } from "node:child_process";

/** What real curl gets from `path` with `token` (a GET, or a POST with no body): the HTTP status. */
function curl(path, token, method = "GET") {
  return execFileSync("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, "-H", `Authorization: Bearer ${token}`, `${base}${path}`]).toString();
}

const base = process.env.HEARTH_URL;
const shots = process.env.SCREENSHOTS ?? "screenshots";
mkdirSync(shots, { recursive: true });
const up = 180_000;

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: ["--no-sandbox"] });
const step = (what) => console.log(`e2e: ${what}`);
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("dialog", (d) => d.accept());
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));

  // axe-core in the page: no serious or critical accessibility violation on any page shot.
  const axe = readFileSync(new URL("../node_modules/axe-core/axe.min.js", import.meta.url), "utf8");
  async function accessible(target, name) {
    await target.addScriptTag({ content: axe });
    const found = await target.evaluate(async () => {
      const r = await window.axe.run(document, { resultTypes: ["violations"] });
      return r.violations.filter((v) => v.impact === "serious" || v.impact === "critical").map((v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(" ")).join(", ")})`);
    });
    if (found.length) throw new Error(`accessibility of ${name}: ${found.join("; ")}`);
  }

  async function shoot(name, target = page) {
    await accessible(target, name);
    await target.screenshot({ path: `${shots}/${name}-desktop.png`, fullPage: true });
    await target.setViewportSize({ width: 390, height: 844 });
    await target.waitForTimeout(100); // the terminal refits on resize
    const wide = await target.evaluate(() => document.documentElement.scrollWidth);
    if (wide > 390) {
      // Name the widest elements that stick out, so the culprit is plain.
      const out = await target.evaluate(() =>
        [...document.querySelectorAll("body *")]
          .map((e) => [e, e.getBoundingClientRect().right])
          .filter(([, r]) => r > 390)
          .sort((a, b) => b[1] - a[1])
          .slice(0, 5)
          .map(([e, r]) => `${e.tagName.toLowerCase()}.${e.className} (${Math.round(r)} px)`),
      );
      throw new Error(`${name} is ${wide} px wide at phone width (390 px): ${out.join(", ")}`);
    }
    await target.screenshot({ path: `${shots}/${name}-phone.png`, fullPage: true });
    await target.setViewportSize({ width: 1280, height: 900 });
  }

  step("set the password from the invitation link");
  await page.goto(process.env.LINK);
  await page.getByLabel("New password").fill(process.env.PASSWORD);
  await page.getByLabel("Again").fill(process.env.PASSWORD);
  await shoot("set-password");
  await page.getByRole("button", { name: "Set password" }).click();

  step("sign in");
  await page.getByLabel("Email").waitFor();
  await page.getByLabel("Email").fill(process.env.EMAIL);
  await page.getByLabel("Password").fill("not the password");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").filter({ hasText: "wrong email or password" }).waitFor();
  await shoot("sign-in");
  await page.getByLabel("Password").fill(process.env.PASSWORD);
  await page.getByRole("button", { name: "Sign in" }).click();

  step("provision");
  const provision = page.getByRole("button", { name: "Provision my VM" });
  await provision.waitFor();
  await page.getByLabel(/^Your SSH public key/).fill(process.env.SSH_PUBLIC_KEY);
  await shoot("size-picker");
  await provision.click();
  await page.getByTestId("log").locator("li").first().waitFor({ timeout: up });
  await page.waitForFunction(() => document.querySelector("[data-testid=state]")?.textContent === "running", null, { timeout: up });
  const lines = await page.getByTestId("log").locator("li").count();
  if (lines < 3) throw new Error(`only ${lines} log lines arrived`);
  step(`running, ${lines} log lines`);
  await page.locator(".facts").getByText(process.env.HOST_NAME, { exact: true }).waitFor();
  await shoot("my-vm");

  step("ssh with the user's own key, as the page says");
  const line = (await page.getByTestId("ssh").locator("code").textContent()).trim();
  const [, port, login] = line.match(/^ssh -p (\d+) (\S+)$/) ?? [];
  if (!port) throw new Error(`a strange ssh line: ${line}`);
  const said = execFileSync("ssh", ["-i", process.env.SSH_KEY_FILE, "-p", port, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", login, "echo via-ssh"]).toString();
  if (said.trim() !== "via-ssh") throw new Error(`ssh said ${JSON.stringify(said)}`);

  step("terminal");
  await page.getByRole("button", { name: "Terminal" }).click();
  await page.locator(".xterm-rows").waitFor();
  await page.waitForTimeout(1000); // the shell's prompt
  await page.locator(".xterm-helper-textarea").focus();
  await page.keyboard.type("echo o''k\n");
  await page.waitForFunction(
    () => [...document.querySelectorAll(".xterm-rows > div")].some((row) => row.textContent.trim() === "ok"),
    null,
    { timeout: 30_000 },
  );
  await shoot("terminal");

  step("settings: an API token, used with curl, then revoked");
  await page.getByRole("link", { name: "Settings" }).click();
  await page.getByLabel("New token's name").fill("laptop");
  await page.getByRole("button", { name: "Make a token" }).click();
  const token = (await page.getByTestId("new-token").textContent()).trim();
  if (curl("/v1/me", token) !== "200") throw new Error("the new token did not work with curl");
  await page.getByRole("cell", { name: "laptop", exact: true }).waitFor();
  await page.getByLabel("New token's name").fill("script");
  await page.getByRole("button", { name: "Make a token" }).click();
  await page.getByRole("cell", { name: "script", exact: true }).waitFor();
  const script = (await page.getByTestId("new-token").textContent()).trim();
  await shoot("settings");
  await page.getByRole("button", { name: "Revoke laptop" }).click();
  await page.getByRole("cell", { name: "laptop", exact: true }).waitFor({ state: "detached" });
  if (curl("/v1/me", token) !== "401") throw new Error("a revoked token still worked");

  step("settings: a secret mail address, a command posted to it through the webhook, listed");
  await page.getByRole("button", { name: "Make my secret address" }).click();
  const address = (await page.getByTestId("mail-address").textContent()).trim();
  if (!/^agent\+[a-z2-7]{26}@hearth\.test$/.test(address)) throw new Error(`not a secret address: ${address}`);
  const posted = execFileSync("curl", [
    "-s", "-u", `sendgrid:${process.env.MAIL_SECRET}`,
    "-F", `headers=From: ${process.env.EMAIL}\nSubject: list please\nMessage-ID: <ui-1@example.com>`,
    "-F", `envelope={"to":["${address}"]}`, "-F", "subject=list please", "-F", "text=thanks",
    `${base}/v1/mail/inbound`,
  ]).toString();
  if (!posted.includes("queued")) throw new Error(`the webhook did not queue it: ${posted}`);
  await page.getByRole("button", { name: "Refresh" }).click();
  await page.getByRole("cell", { name: "list", exact: true }).waitFor();
  await shoot("mail");

  step("an environment with variables and an init script");
  await page.getByRole("link", { name: "Environments" }).click();
  await page.getByLabel("Name").fill("demo");
  await page.getByLabel("Init script (runs once, as dev, when SSH answers)").fill("echo ready > ~/ready");
  await page.getByLabel("Environment variables (KEY=VALUE, one per line)").fill("GREETING=hi");
  await shoot("environments");
  await page.getByRole("button", { name: "Create" }).click();
  await page.waitForFunction(() => document.querySelector("[data-testid=state]")?.textContent === "running", null, { timeout: up });
  await page.getByRole("button", { name: "Terminal" }).click();
  await page.locator(".xterm-rows").waitFor();
  await page.waitForTimeout(1000);
  await page.locator(".xterm-helper-textarea").focus();
  await page.keyboard.type("printenv GREETING; cat ~/ready\n");
  await page.waitForFunction(
    () => {
      const rows = [...document.querySelectorAll(".xterm-rows > div")].map((r) => r.textContent.trim());
      return rows.includes("hi") && rows.includes("ready");
    },
    null,
    { timeout: 30_000 },
  );
  await page.getByRole("textbox", { name: "Command", exact: true }).fill("echo from-exec; exit 3");
  await page.getByRole("button", { name: "Run" }).click();
  await page.getByTestId("exec-result").filter({ hasText: "exit code 3" }).waitFor();
  await page.locator("pre.out").filter({ hasText: "from-exec" }).waitFor();
  await page.getByRole("cell", { name: "echo from-exec; exit 3" }).waitFor();
  await page.getByTestId("activity").filter({ hasText: "last activity was" }).waitFor();
  await shoot("environment");
  const demoId = new URL(page.url()).pathname.split("/").pop();

  step("the list follows a stop made elsewhere, without a reload");
  await page.getByRole("link", { name: "Environments" }).click();
  const demo = page.locator('tr[data-name="demo"]');
  await demo.filter({ hasText: "running" }).filter({ hasText: process.env.HOST_NAME }).waitFor();
  if (curl(`/v1/environments/${demoId}/stop`, script, "POST") !== "202") throw new Error("the stop with curl was refused");
  await demo.filter({ hasText: "stopped" }).waitFor({ timeout: up });
  await demo.getByRole("link", { name: "demo" }).click();
  await page.waitForFunction(() => document.querySelector("[data-testid=state]")?.textContent === "stopped");
  await page.getByRole("button", { name: "Destroy" }).click();
  await page.getByText("This environment is destroyed.").waitFor({ timeout: up });
  await page.getByRole("button", { name: "Back to environments" }).click();
  await page.getByText("None yet.").waitFor();

  step("a user on the admin page");
  await page.goto(`${base}/ui/admin`);
  await page.getByRole("alert").filter({ hasText: "admin role" }).waitFor();
  await shoot("admin-refused");
  await page.getByRole("link", { name: "My VM" }).click();

  step("stop");
  await page.getByRole("button", { name: "Stop" }).click();
  await page.waitForFunction(() => document.querySelector("[data-testid=state]")?.textContent === "stopped", null, { timeout: up });
  step("destroy");
  await page.getByRole("button", { name: "Destroy" }).click();
  await provision.waitFor({ timeout: up });

  step("an admin destroys the user's new VM from the admin page");
  await provision.click();
  await page.waitForFunction(() => document.querySelector("[data-testid=state]")?.textContent === "running", null, { timeout: up });
  const admin = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  admin.on("dialog", (d) => d.accept());
  await admin.goto(process.env.ADMIN_LINK);
  await admin.getByLabel("New password").fill(process.env.PASSWORD);
  await admin.getByLabel("Again").fill(process.env.PASSWORD);
  await admin.getByRole("button", { name: "Set password" }).click();
  await admin.getByLabel("Email").fill(process.env.ADMIN_EMAIL);
  await admin.getByLabel("Password").fill(process.env.PASSWORD);
  await admin.getByRole("button", { name: "Sign in" }).click();
  await admin.getByRole("link", { name: "Admin" }).click();
  const row = admin.locator(`tr[data-owner="${process.env.EMAIL}"]`).filter({ hasText: "running" });
  await row.waitFor({ timeout: 30_000 });
  await admin.getByTestId("chart-Running VMs").filter({ hasText: "running 1 now" }).waitFor();
  await shoot("admin", admin);
  await row.getByRole("button", { name: `Destroy the VM of ${process.env.EMAIL}` }).click();
  // The user's page follows without a reload.
  await provision.waitFor({ timeout: up });

  step("the admin's other tabs: hosts, users (an invitation), jobs, audit");
  await admin.getByRole("tab", { name: "Hosts" }).click();
  await admin.getByRole("article", { name: /^Host / }).first().waitFor();
  await shoot("admin-hosts", admin);
  await admin.getByRole("tab", { name: "Users" }).click();
  await admin.getByLabel("Invite by email").fill("new@example.com");
  await admin.getByRole("button", { name: "Invite" }).click();
  const invitation = (await admin.getByTestId("password-link").textContent()).trim();
  if (!invitation.startsWith(`${base}/ui/password?token=`)) throw new Error(`a strange invitation: ${invitation}`);
  await admin.getByRole("cell", { name: "new@example.com", exact: true }).waitFor();
  await admin.getByRole("button", { name: `Quota of ${process.env.EMAIL}` }).click();
  const quota = admin.getByRole("form", { name: `Quota of ${process.env.EMAIL}` });
  await quota.getByLabel("Environments", { exact: true }).fill("7");
  await quota.getByRole("button", { name: "Save quota" }).click();
  await quota.getByRole("status").filter({ hasText: "Saved." }).waitFor();
  await shoot("admin-users", admin);
  await admin.getByRole("tab", { name: "Jobs" }).click();
  await admin.getByRole("heading", { name: "Jobs" }).waitFor();
  await shoot("admin-jobs", admin);
  await admin.getByRole("tab", { name: "Audit" }).click();
  await admin.getByLabel("Action").fill("sign_in");
  await admin.getByRole("button", { name: "Filter" }).click();
  await admin.getByRole("cell", { name: "sign_in", exact: true }).first().waitFor();
  await admin.getByRole("cell", { name: "password_invite", exact: true }).first().waitFor({ state: "detached" });
  await shoot("admin-audit", admin);
  if (errors.length) throw new Error(`errors in the page: ${errors.join("; ")}`);
  step("done");
} catch (e) {
  // What the pages showed when it failed: their alerts and a screenshot of each.
  for (const [i, p] of browser.contexts().flatMap((c) => c.pages()).entries()) {
    const alerts = await p.getByRole("alert").allTextContents().catch(() => []);
    console.log(`page ${i} (${p.url()}) alerts: ${JSON.stringify(alerts)}`);
    await p.screenshot({ path: `${shots}/failure-${i}.png`, fullPage: true }).catch(() => undefined);
  }
  throw e;
} finally {
  await browser.close();
}
