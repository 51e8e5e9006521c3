"""``python -m liveavatar run-workflow``: run an API-format workflow on a ComfyUI server, fetch its videos.

The pack's examples in API format are ``api_workflows/<example>_api.json`` (the UI-format ones in
``example_workflows/`` are what ComfyUI's template browser shows). POST /prompt, then poll
/history/<prompt_id> until the prompt finished (or failed), then download every output file
(videos, images, audio) through /view into --out and print text outputs (the VRAM Plan's
verdict). Node errors (validation or execution) are printed readably: node id, node type,
input, message. Standard library only; the server defaults to loopback.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class WorkflowError(RuntimeError):
    """The server refused or failed the workflow; the message lists the node errors."""


def _request(url: str, data: dict | None = None, timeout: float = 30.0) -> dict:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        payload = err.read()
        try:
            return {"_http_error": err.code, **json.loads(payload)}
        except ValueError:
            raise WorkflowError(f"{url}: HTTP {err.code}: {payload[:500]!r}") from None
    except urllib.error.URLError as err:
        raise WorkflowError(f"cannot reach the ComfyUI server at {url}: {err.reason}") from None


def format_validation_errors(resp: dict, workflow: dict) -> str:
    lines = []
    err = resp.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('message', 'error')}: {err.get('details', '')}".rstrip(": "))
    for node_id, info in (resp.get("node_errors") or {}).items():
        kind = info.get("class_type") or workflow.get(node_id, {}).get("class_type", "?")
        for e in info.get("errors", []):
            inp = (e.get("extra_info") or {}).get("input_name")
            where = f" input '{inp}'" if inp else ""
            lines.append(f"  node {node_id} ({kind}){where}: {e.get('message', '')} {e.get('details', '')}".rstrip())
    return "\n".join(lines) or json.dumps(resp)[:2000]


def format_execution_error(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type', '')}: {data.get('exception_message', '').strip()}")
        if kind == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"the prompt did not complete: {json.dumps(status)[:1000]}"


def run_workflow(server: str, workflow: dict, out: Path, timeout: float = 3600.0, poll: float = 1.0,
                 log=print) -> list[Path]:
    """Queue ``workflow`` (API format), wait for it, download its outputs into ``out``; returns the files."""
    server = server.rstrip("/")
    client_id = uuid.uuid4().hex
    resp = _request(f"{server}/prompt", {"prompt": workflow, "client_id": client_id})
    if "prompt_id" not in resp:
        raise WorkflowError("the server refused the workflow:\n" + format_validation_errors(resp, workflow))
    prompt_id = resp["prompt_id"]
    log(f"queued prompt {prompt_id}")
    deadline = time.monotonic() + timeout
    while True:
        hist = _request(f"{server}/history/{prompt_id}")
        entry = hist.get(prompt_id)
        if entry and entry.get("status", {}).get("completed") or (entry and entry.get("status", {}).get("status_str") == "error"):
            break
        if time.monotonic() > deadline:
            raise WorkflowError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
        time.sleep(poll)
    status = entry.get("status", {})
    if status.get("status_str") != "success":
        raise WorkflowError(format_execution_error(status))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for node_id, outputs in entry.get("outputs", {}).items():
        for text in outputs.get("text", []) or []:  # e.g. the VRAM Plan's verdict, core Preview Any
            log(f"node {node_id} text:\n{text}")
        for key in ("images", "gifs", "videos", "audio"):
            for item in outputs.get(key, []) or []:
                if not isinstance(item, dict) or "filename" not in item:
                    continue
                query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                                "type": item.get("type", "output")})
                target = out / Path(item["filename"]).name
                with urllib.request.urlopen(f"{server}/view?{query}", timeout=300) as r, open(target, "wb") as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                log(f"node {node_id}: {target}")
                files.append(target)
    return files


API_DIR = Path(__file__).resolve().parent.parent / "api_workflows"


def load_api_workflow(path: str | Path) -> dict:
    """An API-format workflow (``api_workflows/*_api.json``); a UI-format file is refused with its twin's path.

    The API twins live outside ``example_workflows/``: ComfyUI's template browser lists every
    ``.json`` there (and in ``example``, ``examples``, ``workflow``, ``workflows``) and cannot open
    an API-format file.
    """
    path = Path(path)
    data = json.loads(path.read_text())
    if "nodes" in data and "links" in data:
        twin = API_DIR / f"{path.stem}_api.json"
        hint = f"use its API-format twin {twin}" if twin.is_file() else "use an API-format workflow"
        raise ValueError(f"{path} is a UI-format workflow; {hint}, or export one with 'Export (API)' in ComfyUI")
    if not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise ValueError(f"{path}: not an API-format workflow (expected {{id: {{class_type, inputs}}}})")
    return data
