"""A real ComfyUI server runs the API-format examples with tiny models (only when COMFYUI_DIR is set).

The pack is linked as ``custom_nodes/ComfyUI-LiveAvatar`` (a hyphenated folder name) of a
temporary folder registered through ``--extra-model-paths-config``, together with the tiny models;
the server runs ``main.py --cpu`` on loopback with ``COMFYUI_PYTHON`` (default: this Python).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT
from media_probe import probe_media

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR does not point at a ComfyUI checkout")
TINY_EXAMPLES = ["liveavatar_single_gpu_api.json", "liveavatar_24gb_low_vram_api.json"]
# liveavatar_core_loaders: core 'Load CLIP' (wan) and 'AudioEncoderLoader' hard-code umT5-XXL and
# wav2vec2-large, so no tiny file can stand in for them; that example needs the real weights.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from liveavatar_pack.cli.tiny_models import write_tiny_models

    base = tmp_path_factory.mktemp("comfyui")
    write_tiny_models(base / "models")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-LiveAvatar").symlink_to(ROOT, target_is_directory=True)
    shutil.move(str(base / "models" / "input"), str(base / "input"))
    kinds = ["diffusion_models", "loras", "vae", "text_encoders", "audio_encoders"]
    yaml = "liveavatar_test:\n" + f"  base_path: {base / 'models'}\n" + "".join(f"  {k}: {k}\n" for k in kinds)
    yaml += f"liveavatar_nodes:\n  base_path: {base}\n  custom_nodes: custom_nodes\n"
    (base / "extra_model_paths.yaml").write_text(yaml)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--extra-model-paths-config", str(base / "extra_model_paths.yaml"),
         "--input-directory", str(base / "input"), "--output-directory", str(base / "output"),
         "--temp-directory", str(base / "temp"), "--database-url", f"sqlite:///{base / 'db.sqlite'}"],
        cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        info = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/object_info", timeout=10) as r:
                    info = json.loads(r.read())
                break
            except OSError:
                time.sleep(1)
        if info is None:
            log.flush()
            pytest.fail(f"ComfyUI did not serve /object_info:\n{(base / 'server.log').read_text()[-4000:]}")
        yield url, info, base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_pack_nodes_are_registered(server):
    _, info, base = server
    ours = [k for k in info if k.startswith("LiveAvatar")]
    assert len(ours) >= 12, (base / "server.log").read_text()[-3000:]
    assert info["LiveAvatarSampler"]["category"] == "LiveAvatar"
    assert "wan2.2_s2v_14B_bf16.safetensors" in info["LiveAvatarModelLoader"]["input"]["required"]["dit_name"][1]["options"] \
        or "wan2.2_s2v_14B_bf16.safetensors" in info["LiveAvatarModelLoader"]["input"]["required"]["dit_name"][0]


def test_template_browser_lists_only_ui_workflows_with_thumbnails(server):
    """What the template browser shows: every listed template opens (UI format) and has its thumbnail."""
    url, _, _ = server
    with urllib.request.urlopen(f"{url}/workflow_templates", timeout=30) as r:
        listed = json.loads(r.read()).get("ComfyUI-LiveAvatar", [])
    # (a set: a checkout that also sits in ComfyUI's own custom_nodes is listed twice)
    assert set(listed) == {p.stem for p in (ROOT / "example_workflows").glob("*.json")}, listed
    for name in listed:
        with urllib.request.urlopen(f"{url}/api/workflow_templates/ComfyUI-LiveAvatar/{name}.json", timeout=30) as r:
            data = json.loads(r.read())
        assert "nodes" in data and "version" in data, f"{name} is not a UI-format workflow"
        with urllib.request.urlopen(f"{url}/api/workflow_templates/ComfyUI-LiveAvatar/{name}.jpg", timeout=30) as r:
            assert r.read(3) == b"\xff\xd8\xff", f"{name}.jpg is not a JPEG"


@pytest.mark.parametrize("name", TINY_EXAMPLES)
def test_api_example_makes_an_mp4_with_sound(server, name, tmp_path):
    from liveavatar_pack.cli.run_workflow import load_api_workflow, run_workflow

    url, _, base = server
    workflow = load_api_workflow(ROOT / "api_workflows" / name)
    lines = []
    files = run_workflow(url, workflow, tmp_path, timeout=900, log=lines.append)
    videos = [f for f in files if f.suffix == ".mp4"]
    assert videos, f"no video came back: {files}\n{(base / 'server.log').read_text()[-3000:]}"
    streams, audio_secs = probe_media(videos[0])
    assert ("Video", "h264") in streams and audio_secs and audio_secs > 1.0
    plans = [k for k, v in workflow.items() if v["class_type"] == "LiveAvatarVRAMPlan"]
    for node_id in plans + [k for k, v in workflow.items() if v["class_type"] == "PreviewAny"]:
        text = next((line for line in lines if line.startswith(f"node {node_id} text:")), "")
        assert "fits: peak" in text or "does not fit" in text, f"node {node_id} showed no verdict: {lines}"


def test_vram_plan_verdict_is_shown_by_the_pack_web_extension(server):
    """The frontend shows a node's text output only for core 'Preview Any'; the pack's extension shows the plan's."""
    url, _, _ = server
    with urllib.request.urlopen(f"{url}/extensions", timeout=30) as r:
        scripts = json.loads(r.read())
    assert "/extensions/ComfyUI-LiveAvatar/vram_plan.js" in scripts, scripts
    with urllib.request.urlopen(f"{url}/extensions/ComfyUI-LiveAvatar/vram_plan.js", timeout=30) as r:
        js = r.read().decode()
    assert '"LiveAvatarVRAMPlan"' in js and "message?.text" in js


# widgets the core frontend itself puts into every queued prompt (display only; the server ignores them)
CORE_DISPLAY_WIDGETS = {("LoadAudio", "audioUI"), ("PreviewAny", "preview")}


def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or next(
        (p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p), None)


def test_ui_examples_queue_what_their_api_twins_say(server):
    """The real frontend loads each UI example (every node known, every combo value valid) and, after the nodes
    have shown a run's text, queues the same prompt as its API twin: no display widget (the VRAM Plan's
    verdict) leaks into the prompt, where it would change the node's cache key and re-run it on every queue."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium (set CHROMIUM): the frontend check needs a headless browser")
    url, info, _ = server
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    run = subprocess.run([python, str(ROOT / "docs" / "ui_prompts.py"), "--server", url, "--chromium", chromium],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert set(found) == {p.stem for p in (ROOT / "example_workflows").glob("*.json")}
    for name, ui in found.items():
        assert ui["missing"] == [] and ui["bad_combos"] == [], (name, ui["missing"], ui["bad_combos"])
        twin = json.loads((ROOT / "api_workflows" / f"{name}_api.json").read_text())
        assert set(ui["prompt"]) == set(twin), (name, sorted(ui["prompt"]), sorted(twin))
        for node_id, node in ui["prompt"].items():
            cls, want = node["class_type"], twin[node_id]["inputs"]
            assert cls == twin[node_id]["class_type"], (name, node_id, cls)
            optional = info[cls]["input"].get("optional", {})
            for key, value in node["inputs"].items():
                if (cls, key) in CORE_DISPLAY_WIDGETS:
                    continue
                if key not in want:  # the twin may leave an optional input at its default (a combo's: its first)
                    spec = optional.get(key, [None, {}])
                    default = spec[1].get("default", spec[0][0] if isinstance(spec[0], list) and spec[0] else None)
                    assert key in optional and value == default, \
                        f"{name}: node {node_id} ({cls}) queues {key}={str(value)[:80]!r}, not in its API twin"
                else:
                    assert value == want[key], f"{name}: node {node_id} ({cls}).{key}: UI {value!r}, API {want[key]!r}"
            assert set(want) <= set(node["inputs"]), (name, node_id, set(want) - set(node["inputs"]))


def test_missing_gpus_fail_fast_with_a_short_type_name(server):
    """The multi-GPU example on this GPU-less server: refused before torchrun starts, type name without a path."""
    from liveavatar_pack.cli.run_workflow import WorkflowError, load_api_workflow, run_workflow

    url, _, _ = server
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    count = subprocess.run([python, "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True,
                           text=True, timeout=120).stdout.strip()
    if count and int(count) >= 4:
        pytest.skip(f"this machine has {count} GPUs: the example's gpus 0,1,2,3 exist")
    workflow = load_api_workflow(ROOT / "api_workflows" / "liveavatar_multi_gpu_api.json")
    with pytest.raises(WorkflowError) as err:
        run_workflow(url, workflow, Path("/nonexistent"), timeout=300, log=lambda *_: None)
    text = str(err.value)
    assert "(LiveAvatarDistributedLauncher) failed: liveavatar.GPUsNotFound: gpus 0,1,2,3: GPU" in text, text
    assert "\n" not in text.strip() and "Traceback" not in text


def test_node_errors_are_readable(server):
    from liveavatar_pack.cli.run_workflow import WorkflowError, load_api_workflow, run_workflow

    url, _, _ = server
    workflow = load_api_workflow(ROOT / "api_workflows" / "liveavatar_single_gpu_api.json")
    workflow["10"]["inputs"]["frames_per_clip"] = 50
    del workflow["9"]["inputs"]["image"]
    with pytest.raises(WorkflowError) as err:
        run_workflow(url, workflow, Path("/nonexistent"), timeout=60, log=lambda *_: None)
    text = str(err.value)
    assert "node 9 (LiveAvatarReferenceImage)" in text and "image" in text
