// A preview URL in headless Chromium: opened without a Hearth session it sends the browser to
// sign in; signed in, the round trip through Hearth's origin lands on the guest's page at `/`
// of its own origin, whose script (by absolute path), same-origin fetches (a POST too) and
// WebSocket pass with the preview's cookie, which the page's JavaScript cannot read.
// Run by crates/hearth/tests/tunnels.rs with HEARTH_URL, PREVIEW_URL, EMAIL, PASSWORD and
// SCREENSHOTS set; *.preview.test resolves to this machine.
import { chromium } from "playwright-core";

const base = process.env.HEARTH_URL;
const preview = process.env.PREVIEW_URL;
const shots = process.env.SCREENSHOTS ?? "screenshots";
const step = (what) => console.log(`preview: ${what}`);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--host-resolver-rules=MAP *.preview.test 127.0.0.1"],
});

try {
  const page = await browser.newPage();
  step("opened without a session: sent to sign in at Hearth");
  await page.goto(preview);
  await page.getByRole("alert").filter({ hasText: "open the preview again" }).waitFor();
  if (!page.url().startsWith(base)) throw new Error(`not at Hearth: ${page.url()}`);
  await page.getByLabel("Email").fill(process.env.EMAIL);
  await page.getByLabel("Password").fill(process.env.PASSWORD);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("button", { name: "Sign out" }).waitFor();

  step("signed in: the guest's page at its own origin, its script loaded by absolute path");
  await page.goto(preview);
  await page.waitForFunction(() => document.title === "app");
  if (new URL(page.url()).origin !== new URL(preview).origin) throw new Error(`landed at ${page.url()}`);
  await page.screenshot({ path: `${shots}/preview.png` });

  step("the page's own requests pass with the cookie, which it cannot read");
  const seen = await page.evaluate(async () => {
    const headers = await (await fetch("/headers")).json();
    const post = await fetch("/sha256", { method: "POST", body: "x" });
    const echoed = await new Promise((resolve, reject) => {
      const ws = new WebSocket(`${location.origin.replace("http", "ws")}/ws`);
      ws.onopen = () => ws.send("ping");
      ws.onmessage = (m) => { resolve(m.data); ws.close(); };
      ws.onerror = () => reject(new Error("the WebSocket failed"));
    });
    return { headers, post: post.status, echoed, cookies: document.cookie };
  });
  if (seen.post !== 200) throw new Error(`POST: ${seen.post}`);
  if (seen.echoed !== "ping") throw new Error(`WebSocket: ${seen.echoed}`);
  if (seen.cookies.includes("hearth_")) throw new Error(`the page reads ${seen.cookies}`);
  if ("cookie" in seen.headers || "authorization" in seen.headers) throw new Error(JSON.stringify(seen.headers));
  if (seen.headers["x-forwarded-host"] !== new URL(preview).host) throw new Error(JSON.stringify(seen.headers));
  step("done");
} finally {
  await browser.close();
}
