"""Run with ComfyUI's Python (selenium installed there), against a running ComfyUI: opens its own
frontend in headless Chromium and, for each workflow file, loads it as a file drop does
(app.loadGraphData), then reports the node types the page does not know, the widget values after
load and after save (app.graph.serialize()), the API prompt (app.graphToPrompt()) and, for the first
TDM widget with a number, whether an edit of it reaches the prompt. Prints one JSON object.

With a third argument (a folder), it also writes a screenshot of each loaded workflow there, fitted to
the view: ``<name>.jpg``, whose JPEG comment is the sha256 of the workflow file it shows (so a test
can tell a thumbnail that no longer matches its workflow)."""

import hashlib
import io
import json
import sys
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

url, paths = sys.argv[1], json.loads(sys.argv[2])
shots = Path(sys.argv[3]) if len(sys.argv) > 3 else None
QUIET = """
const done = arguments[arguments.length - 1];
(async () => {  // a screenshot shows the graph only: no missing-model dialog, no minimap
  const settings = window.app.extensionManager.setting;
  for (const [key, value] of [["Comfy.Workflow.ShowMissingModelsWarning", false],
                              ["Comfy.Workflow.ShowMissingNodesWarning", false], ["Comfy.Minimap.Visible", false]]) {
    try { await settings.set(key, value); } catch (e) {}
  }
  done(true);
})();
"""
FIT = """
const done = arguments[arguments.length - 1];
(async () => {
  document.dispatchEvent(new KeyboardEvent("keydown", {key: "Escape"}));
  try { await window.app.extensionManager.command.execute("Comfy.Canvas.FitView"); }
  catch (e) { window.app.canvas.ds.reset(); }
  window.app.graph.setDirtyCanvas(true, true);
  done(true);
})();
"""


def screenshot(path: str) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By

    driver.execute_async_script(FIT)
    time.sleep(1.0)  # a few frames for the canvas to redraw
    png = driver.find_element(By.CSS_SELECTOR, "canvas#graph-canvas").screenshot_as_png
    image = Image.open(io.BytesIO(png)).convert("RGB")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    image.save(shots / (Path(path).stem + ".jpg"), "JPEG", quality=85, comment=f"workflow sha256 {digest}".encode())
options = Options()
for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1600,1000"):
    options.add_argument(flag)
options.binary_location = "/usr/bin/chromium"
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
driver.set_script_timeout(120)
LOAD = """
const [workflow, done] = [arguments[0], arguments[arguments.length - 1]];
(async () => {
  try {
    await window.app.loadGraphData(workflow);
    const known = window.LiteGraph.registered_node_types;
    const nodes = window.app.graph._nodes;
    const missing = nodes.filter(n => !known[n.type]).map(n => n.type);
    const loaded = Object.fromEntries(nodes.map(n => [String(n.id), (n.widgets || []).map(w => w.value)]));
    const saved = Object.fromEntries(window.app.graph.serialize().nodes.map(n => [String(n.id), n.widgets_values || []]));
    let edit = null;
    const tdm = nodes.find(n => n.type.startsWith("TDM") && (n.widgets || []).some(w => typeof w.value === "number" && w.type !== "combo"));
    if (tdm) {
      const w = tdm.widgets.find(w => typeof w.value === "number" && w.type !== "combo");
      const before = w.value;
      w.value = before + 1;
      const p = await window.app.graphToPrompt();
      edit = {node: String(tdm.id), widget: w.name, set: before + 1, in_prompt: p.output[String(tdm.id)]?.inputs?.[w.name]};
      w.value = before;
    }
    const prompt = (await window.app.graphToPrompt()).output;
    done({missing, loaded, saved, edit, prompt});
  } catch (e) { done({error: String(e && e.stack || e)}); }
})();
"""
try:
    driver.get(url)
    WebDriverWait(driver, 120).until(lambda d: d.execute_script(
        "return !!(window.app && window.app.graph && window.LiteGraph && window.LiteGraph.registered_node_types.TDMScheduler)"))
    if shots is not None:
        driver.execute_async_script(QUIET)
    results = {}
    for path in paths:
        with open(path) as handle:
            results[path] = driver.execute_async_script(LOAD, json.load(handle))
        if shots is not None:
            driver.execute_async_script(LOAD, json.loads(Path(path).read_text()))  # undo the test edit's redraw
            screenshot(path)
    print(json.dumps(results))
finally:
    driver.quit()
