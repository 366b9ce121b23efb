// Screenshot of MLflow's compare-runs view with chosen parameters and metrics, in headless Chrome.
// Not part of llmlab: a documentation helper. Needs node and, in the folder you run it from:
//   npm install @sparticuz/chromium puppeteer-core
// Usage: node take.mjs URL OUT.png PARAM,PARAM METRIC,METRIC
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";

const [url, out, params, metrics] = process.argv.slice(2);
const pause = (ms) => new Promise((r) => setTimeout(r, ms));
const browser = await puppeteer.launch({
  args: [...chromium.args, "--no-sandbox"],
  defaultViewport: { width: 1500, height: 1050 },
  executablePath: await chromium.executablePath(),
  headless: true,
});
const page = await browser.newPage();
await page.goto(url, { waitUntil: "networkidle0", timeout: 120000 });
await pause(4000);
try { await page.locator('button[aria-label="Close"]').setTimeout(2000).click(); } catch { /* no assistant panel */ }
await page.locator("::-p-text(Clear All)").click();
const [paramBox, metricBox] = await page.$$('input[role="combobox"]');
for (const [box, items] of [[paramBox, params], [metricBox, metrics]]) {
  for (const item of items.split(",").filter(Boolean)) {
    await box.click();
    await box.type(item);
    await pause(400);
    await page.keyboard.press("Enter");
    await pause(400);
  }
  await page.keyboard.press("Escape");
}
await page.mouse.click(5, 5);
await pause(2500);
await page.screenshot({ path: out });
await browser.close();
