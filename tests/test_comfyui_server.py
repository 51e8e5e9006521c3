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


@pytest.mark.parametrize("name", TINY_EXAMPLES)
def test_api_example_makes_an_mp4_with_sound(server, name, tmp_path):
    from liveavatar_pack.cli.run_workflow import load_api_workflow, run_workflow

    url, _, base = server
    workflow = load_api_workflow(ROOT / "example_workflows" / name)
    files = run_workflow(url, workflow, tmp_path, timeout=900, log=lambda *_: None)
    videos = [f for f in files if f.suffix == ".mp4"]
    assert videos, f"no video came back: {files}\n{(base / 'server.log').read_text()[-3000:]}"
    streams, audio_secs = probe_media(videos[0])
    assert ("Video", "h264") in streams and audio_secs and audio_secs > 1.0


def test_node_errors_are_readable(server):
    from liveavatar_pack.cli.run_workflow import WorkflowError, load_api_workflow, run_workflow

    url, _, _ = server
    workflow = load_api_workflow(ROOT / "example_workflows" / "liveavatar_single_gpu_api.json")
    workflow["10"]["inputs"]["frames_per_clip"] = 50
    del workflow["9"]["inputs"]["image"]
    with pytest.raises(WorkflowError) as err:
        run_workflow(url, workflow, Path("/nonexistent"), timeout=60, log=lambda *_: None)
    text = str(err.value)
    assert "node 9 (LiveAvatarReferenceImage)" in text and "image" in text
