"""What ComfyUI's real frontend makes of each example workflow: missing node types, combo values
that are not among the options, and the API prompt it would queue (``app.graphToPrompt``).

Each node's ``onExecuted`` is first fed a text message, as after a run (the VRAM Plan then shows a
verdict), so a display widget that leaks into the queued prompt shows up. Prints one JSON object
``{name: {"missing": [...], "bad_combos": [...], "prompt": {...}}}``; tests compare the prompts with
the ``api_workflows/`` twins.

    python docs/ui_prompts.py --server http://127.0.0.1:8188 --chromium chromium

Needs ``aiohttp`` (a ComfyUI dependency); run it with ComfyUI's Python.
"""
from __future__ import annotations

import argparse
import asyncio
import json

from thumbnails import ROOT, open_page

INSPECT = """(async () => {
  for (const n of app.graph._nodes) n.onExecuted?.({text: ["a verdict shown after a run"]});
  const missing = app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type);
  const bad = app.graph._nodes.flatMap(n => (n.widgets || [])
    .filter(w => w.type === "combo" && Array.isArray(w.options?.values) && !w.options.values.includes(w.value))
    .map(w => `${n.type}.${w.name}=${w.value}`));
  return {missing, bad_combos: bad, prompt: (await app.graphToPrompt()).output};
})()"""


async def inspect(server: str, chromium: str, names: list[str]) -> dict:
    found = {}
    async with open_page(server, chromium) as page:
        for name in names:
            wf = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
            await page.js(f"app.loadGraphData({json.dumps(wf)}).then(() => true)")
            await asyncio.sleep(1)
            found[name] = await page.js(INSPECT)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    ap.add_argument("--chromium", default="chromium")
    ap.add_argument("--names", nargs="*", help="workflows (default: every example)")
    args = ap.parse_args()
    names = args.names or sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))
    print(json.dumps(asyncio.run(inspect(args.server, args.chromium, names))))


if __name__ == "__main__":
    main()
