"""Run with ComfyUI's Python (selenium installed there), against a running ComfyUI: opens its own
frontend in headless Chromium and, for each workflow file, loads it as a file drop does
(app.loadGraphData), then reports the node types the page does not know, the widget values after
load and after save (app.graph.serialize()), the API prompt (app.graphToPrompt()) and, for the first
TDM widget with a number, whether an edit of it reaches the prompt. Prints one JSON object."""

import json
import sys

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

url, paths = sys.argv[1], json.loads(sys.argv[2])
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
    results = {}
    for path in paths:
        with open(path) as handle:
            results[path] = driver.execute_async_script(LOAD, json.load(handle))
    print(json.dumps(results))
finally:
    driver.quit()
