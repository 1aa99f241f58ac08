// The UI end to end in headless Chromium (Debian's `chromium`, driven by playwright-core):
// set a password from an invitation link, sign in with it, provision the personal VM, watch log lines arrive and the state
// turn `running` without a reload, run `echo ok` in the terminal, stop, destroy. Saves a
// screenshot of each page at desktop and phone width into $SCREENSHOTS.
//
// Run by crates/hearth/tests/ui.rs with HEARTH_URL, LINK (an invitation), EMAIL, PASSWORD and
// SCREENSHOTS set.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

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

  async function shoot(name) {
    await page.screenshot({ path: `${shots}/${name}-desktop.png`, fullPage: true });
    await page.setViewportSize({ width: 390, height: 844 });
    await page.screenshot({ path: `${shots}/${name}-phone.png`, fullPage: true });
    await page.setViewportSize({ width: 1280, height: 900 });
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
  await shoot("size-picker");
  await provision.click();
  await page.getByTestId("log").locator("li").first().waitFor({ timeout: up });
  await page.waitForFunction(() => document.querySelector("[data-testid=state]")?.textContent === "running", null, { timeout: up });
  const lines = await page.getByTestId("log").locator("li").count();
  if (lines < 3) throw new Error(`only ${lines} log lines arrived`);
  step(`running, ${lines} log lines`);
  await shoot("my-vm");

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

  step("stop");
  await page.getByRole("button", { name: "Stop" }).click();
  await page.waitForFunction(() => document.querySelector("[data-testid=state]")?.textContent === "stopped", null, { timeout: up });
  step("destroy");
  await page.getByRole("button", { name: "Destroy" }).click();
  await provision.waitFor({ timeout: up });
  if (errors.length) throw new Error(`errors in the page: ${errors.join("; ")}`);
  step("done");
} finally {
  await browser.close();
}
