// How long each page of the web UI takes to show its content in headless Chromium:
// from navigation start to the selector that says the page has loaded, median of RUNS
// loads (the browser's cache warm, as for a returning user). Run by scripts/bench_ui.py.
import { chromium } from "playwright-core";

const base = process.env.HEARTH_URL;
const runs = Number(process.env.RUNS ?? 7);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: ["--no-sandbox"] });
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(base);
  await page.getByLabel("Email").fill(process.env.EMAIL);
  await page.getByLabel("Password").fill(process.env.PASSWORD);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("link", { name: "My VM" }).waitFor();
  const pages = [
    ["My VM", "/", () => page.getByTestId("state").waitFor()],
    ["Environments (first 100 of the list)", "/ui/environments", () => page.locator("tr[data-name]").nth(99).waitFor()],
    ["Settings", "/ui/settings", () => page.getByRole("cell", { name: "default", exact: true }).waitFor()],
    ["Admin: VMs", "/ui/admin", () => page.locator("tr[data-owner]").first().waitFor()],
  ];
  const rows = [];
  for (const [name, path, ready] of pages) {
    const times = [];
    for (let i = 0; i < runs; i++) {
      const started = performance.now();
      await page.goto(base + path);
      await ready();
      times.push(performance.now() - started);
    }
    rows.push(`| ${name} | ${median(times).toFixed(0)} ms (${Math.min(...times).toFixed(0)}-${Math.max(...times).toFixed(0)}, n=${runs}) |`);
  }
  console.log(["| page | navigation to content |", "|---|---|", ...rows].join("\n"));
} finally {
  await browser.close();
}
