// Real-browser check of the pack's frontend extension (web/hunyuan_image3_text.js), run by
// run_comfyui_e2e.py against its live ComfyUI server:
//   node browser_text_check.mjs URL RUN_WORKFLOW.json LAYOUT_WORKFLOW.json SCREENSHOT.png RESULT.json [STEPS]
// 1. opens ComfyUI's frontend in headless Chromium, loads RUN_WORKFLOW (UI format; its Generate node set to
//    STEPS steps), queues it from the page and waits for the Generate node's text box to fill and the
//    image to show; records the text, the node's size, and a screenshot;
// 2. loads LAYOUT_WORKFLOW and records every node's box as the frontend laid it out (title bar
//    included), so the runner can check that no node covers another; a second screenshot (*_layout.png).
// Needs playwright-core (PLAYWRIGHT_CORE: its folder, else resolved by Node) and Chromium
// (CHROMIUM, default /usr/bin/chromium). Writes RESULT.json; exit 0 when it could run at all.
import { writeFileSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";

const [url, runPath, layoutPath, shotPath, resultPath, steps] = process.argv.slice(2);
const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");
const TEXT_WIDGET = "hunyuan_text";
const GENERATE = "HunyuanImage3Generate";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const result = { errors: [], page_errors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on("pageerror", (e) => result.page_errors.push(String(e)));
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => (window.comfyAPI?.app?.app ?? window.app)?.graph, null, { timeout: 120000 });
  result.extensions = await page.evaluate(async () => (await (await fetch("/extensions")).json()));
  const loadGraph = async (data) => { // resolves once the frontend shows the workflow's nodes
    await page.evaluate(async (graph) => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      await app.loadGraphData(graph);
    }, data);
    await page.waitForFunction((types) => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      const have = (app.graph?._nodes ?? []).map((n) => n.type);
      return types.every((t) => have.includes(t));
    }, data.nodes.map((n) => n.type), { timeout: 60000, polling: 250 });
  };

  await loadGraph(JSON.parse(readFileSync(runPath, "utf8")));
  await page.keyboard.press("Escape"); // any dialog the first start opens
  if (steps) {
    await page.evaluate(([type, n]) => {
      const app = window.comfyAPI?.app?.app ?? window.app;
      const node = app.graph._nodes.find((x) => x.type === type);
      node.widgets.find((w) => w.name === "steps").value = n;
    }, [GENERATE, Number(steps)]);
  }
  await page.evaluate(async () => (window.comfyAPI?.app?.app ?? window.app).queuePrompt(0, 1));
  const handle = await page.waitForFunction(([type, name]) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const node = app.graph._nodes.find((n) => n.type === type);
    const widget = node?.widgets?.find((w) => w.name === name);
    return widget?.value ? { text: widget.value, size: Array.from(node.size), id: node.id } : null;
  }, [GENERATE, TEXT_WIDGET], { timeout: 600000, polling: 250 });
  result.generate = await handle.jsonValue();
  await page.waitForFunction(() => { // the saved image shown too: the whole prompt ran
    const app = window.comfyAPI?.app?.app ?? window.app;
    return app.graph._nodes.some((n) => n.type === "SaveImage" && n.imgs?.length);
  }, null, { timeout: 120000, polling: 250 }).catch(() => result.errors.push("Save Image showed no image"));
  await page.evaluate((id) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const node = app.graph.getNodeById(id);
    app.canvas.ds.offset = [-node.pos[0] + 420, -node.pos[1] + 80]; // the Generate node in view
    app.canvas.setDirty(true, true);
  }, result.generate.id);
  await page.waitForTimeout(500);
  await page.screenshot({ path: shotPath });

  await loadGraph(JSON.parse(readFileSync(layoutPath, "utf8")));
  await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    app.canvas.ds.offset = [60, 40];
    app.canvas.ds.scale = 0.8;
    app.canvas.setDirty(true, true);
  });
  await page.waitForTimeout(500);
  await page.screenshot({ path: shotPath.replace(/\.png$/, "_layout.png") });
  result.layout = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    return app.graph._nodes.map((n) => ({ title: n.title, box: Array.from(n.boundingRect) }));
  });
} catch (e) {
  result.errors.push(String(e && e.stack || e));
} finally {
  await browser.close();
  writeFileSync(resultPath, JSON.stringify(result, null, 2));
}
