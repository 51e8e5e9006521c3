"""Every example workflow (UI format and its API twin) checked against the node schemas: node types
exist, links connect matching types, widget values are valid, and the twins describe the same graph."""
from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path

import pytest

from node_env import comfy_double

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "example_workflows"
API_WORKFLOWS = ROOT / "api_workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
# folders ComfyUI's template browser scans in a custom node pack (app/custom_node_manager.py)
SCANNED = ("example_workflows", "example", "examples", "workflow", "workflows")

# Core ComfyUI nodes the examples use: (sockets [(name, type)], widgets [(name, kind, options)], outputs)
CORE = {
    "LoadImage": ([], [("image", "COMBO", "input")], ["IMAGE", "MASK"]),
    "LoadAudio": ([], [("audio", "COMBO", "input")], ["AUDIO"]),
    "CLIPLoader": ([], [("clip_name", "COMBO", "text_encoders"), ("type", "COMBO", ["wan"])], ["CLIP"]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("text", "STRING", None)], ["CONDITIONING"]),
    "AudioEncoderLoader": ([], [("audio_encoder_name", "COMBO", "audio_encoders")], ["AUDIO_ENCODER"]),
    "AudioEncoderEncode": ([("audio_encoder", "AUDIO_ENCODER"), ("audio", "AUDIO")], [], ["AUDIO_ENCODER_OUTPUT"]),
    "PreviewAny": ([("source", "*")], [], []),
}
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its ``pos``
UI_ONLY_TRAILING = {"LoadImage": 1, "LoadAudio": 2}  # upload widgets the frontend stores after the real ones


@pytest.fixture(scope="module")
def schemas(tmp_path_factory):
    from liveavatar_pack.cli.tiny_models import write_tiny_models

    base = tmp_path_factory.mktemp("comfy")
    write_tiny_models(base / "models")
    with comfy_double(base) as env:
        table = {}
        for node in env.nodes.all_nodes():
            s = node.define_schema()
            sockets = [(i.id, i.io_type) for i in s.inputs if not i.widget]
            widgets = [i for i in s.inputs if i.widget]
            table[s.node_id] = (sockets, widgets, [o.io_type for o in s.outputs], s)
        inputs = sorted(p.name for p in (base / "models" / "input").iterdir())
        files = {k: env.folder_paths.get_filename_list(k) for k in ("text_encoders", "audio_encoders")}
        yield table, inputs, files


def _check_widget(node_type: str, widget, value, inputs, files) -> None:
    if isinstance(widget, tuple):  # core table entry
        name, kind, options = widget
        if kind == "COMBO":
            allowed = inputs if options == "input" else files[options] if isinstance(options, str) else options
            assert value in allowed, f"{node_type}.{name}: {value!r} not in {allowed}"
        else:
            assert isinstance(value, str)
        return
    name, kind = widget.id, widget.io_type
    if kind == "COMBO":
        assert value in widget.options, f"{node_type}.{name}: {value!r} not in {widget.options}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{node_type}.{name}: {value!r} is not an int"
        assert widget.min is None or value >= widget.min, f"{node_type}.{name}: {value} < {widget.min}"
        assert widget.max is None or value <= widget.max, f"{node_type}.{name}: {value} > {widget.max}"
        if widget.step and widget.min is not None:
            assert (value - widget.min) % widget.step == 0, f"{node_type}.{name}: {value} off the step {widget.step}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool)
    elif kind == "STRING":
        assert isinstance(value, str)


def _signature(table, node_type):
    if node_type in table:
        sockets, widgets, outputs, _ = table[node_type]
        return sockets, widgets, outputs
    assert node_type in CORE, f"unknown node type {node_type}"
    return CORE[node_type]


def test_there_are_the_three_examples():
    names = {p.stem for p in UI_FILES}
    assert {"liveavatar_single_gpu", "liveavatar_24gb_low_vram", "liveavatar_core_loaders"} <= names
    for p in UI_FILES:
        assert (API_WORKFLOWS / f"{p.stem}_api.json").is_file(), f"{p.name} has no API twin"


def test_scanned_folders_hold_only_ui_workflows_with_thumbnails():
    """The template browser lists every .json of these folders; an API-format file opens as an empty canvas."""
    for folder in SCANNED:
        for path in sorted((ROOT / folder).glob("*.json")) if (ROOT / folder).is_dir() else []:
            data = json.loads(path.read_text())
            assert "nodes" in data and "links" in data and "version" in data, f"{path} is not a UI-format workflow"
            thumb = path.with_suffix(".jpg")
            assert thumb.is_file(), f"{path.name} has no thumbnail {thumb.name}"
            assert thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb.name} is not a JPEG"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_matches_schemas(path, schemas):
    table, inputs, files = schemas
    wf = json.loads(path.read_text())
    uuid.UUID(wf["id"])  # ComfyUI's frontend refuses a workflow id that is not a UUID (zod schema alert)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        _, _, outputs = _signature(table, nodes[src]["type"])
        sockets, _, _ = _signature(table, nodes[dst]["type"])
        assert outputs[src_slot] == typ, f"link {link_id}: {nodes[src]['type']} output {src_slot} is {outputs[src_slot]}, not {typ}"
        dst_input = nodes[dst]["inputs"][dst_slot]
        expected = dict(sockets)[dst_input["name"]]
        assert expected in (typ, "*"), f"link {link_id}: {nodes[dst]['type']}.{dst_input['name']} takes {expected}, not {typ}"
        assert dst_input["link"] == link_id
    for node in wf["nodes"]:
        sockets, widgets, _ = _signature(table, node["type"])
        required = {n for n, _ in sockets} - _optional(table, node["type"])
        linked = {i["name"] for i in node["inputs"] if i["link"] is not None}
        assert required <= linked, f"{node['type']} (id {node['id']}): unconnected {sorted(required - linked)}"
        values = list(node["widgets_values"])
        for widget in widgets:
            _check_widget(node["type"], widget, values.pop(0), inputs, files)
            if not isinstance(widget, tuple) and widget.id == "seed":  # control_after_generate's own value
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert len(values) == UI_ONLY_TRAILING.get(node["type"], 0), f"{node['type']}: extra widget values {values}"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_nodes_do_not_overlap(path):
    """Saved boxes (title bar included) are disjoint, so the example opens readable in the browser."""
    nodes = json.loads(path.read_text())["nodes"]
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes}
    types = {n["id"]: n["type"] for n in nodes}
    for a, b in itertools.combinations(sorted(boxes), 2):
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, \
            f"{path.name}: node {a} ({types[a]}) overlaps node {b} ({types[b]})"
    for n in nodes:
        if n["type"] == "LoadImage":  # the frontend grows it to show the image: 314 px at 320 wide
            assert n["size"][1] >= 314, f"{path.name}: LoadImage is drawn taller than its saved {n['size']}"


def test_low_vram_example_shows_the_plan():
    """The VRAM Plan's text output is wired to core 'Preview Any' (which displays text in the browser)."""
    wf = json.loads((WORKFLOWS / "liveavatar_24gb_low_vram.json").read_text())
    types = {n["id"]: n["type"] for n in wf["nodes"]}
    plan_links = [link for link in wf["links"] if types[link[1]] == "LiveAvatarVRAMPlan" and link[2] == 0]
    assert plan_links and all(types[link[3]] == "PreviewAny" for link in plan_links)
    api = json.loads((API_WORKFLOWS / "liveavatar_24gb_low_vram_api.json").read_text())
    plan_id = next(k for k, v in api.items() if v["class_type"] == "LiveAvatarVRAMPlan")
    assert any(v["class_type"] == "PreviewAny" and v["inputs"]["source"] == [plan_id, 0] for v in api.values())


def _optional(table, node_type) -> set[str]:
    if node_type in table:
        return {i.id for i in table[node_type][3].inputs if i.optional}
    return set()


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_twin_is_the_same_graph(path, schemas):
    table, inputs, files = schemas
    ui = json.loads(path.read_text())
    api = json.loads((API_WORKFLOWS / f"{path.stem}_api.json").read_text())
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert set(api) == set(nodes)
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        name = nodes[str(dst)]["inputs"][dst_slot]["name"]
        assert api[str(dst)]["inputs"][name] == [str(src), src_slot]
    for nid, node in api.items():
        assert node["class_type"] == nodes[nid]["type"]
        _, widgets, _ = _signature(table, node["class_type"])
        for widget in widgets:
            name = widget[0] if isinstance(widget, tuple) else widget.id
            _check_widget(node["class_type"], widget, node["inputs"][name], inputs, files)


def test_tiny_models_fill_a_comfyui_install_readably(tmp_path):
    """Into ComfyUI/models: files get the umask's mode (not 0600) and the inputs land in ComfyUI/input, said so."""
    import os
    import stat
    import subprocess
    import sys

    comfy = tmp_path / "ComfyUI"
    (comfy / "models").mkdir(parents=True)
    (comfy / "main.py").write_text("")
    (comfy / "folder_paths.py").write_text("")
    run = subprocess.run([sys.executable, "-m", "liveavatar", "tiny-models", "--out", str(comfy / "models")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(0o022))
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in (comfy / "input").iterdir()) == ["liveavatar_example.png", "liveavatar_example.wav"]
    assert not (comfy / "models" / "input").exists()
    assert f"ComfyUI's input folder {comfy / 'input'}" in run.stdout
    files = [p for p in comfy.rglob("*") if p.is_file() and p.name not in ("main.py", "folder_paths.py")]
    assert len(files) >= 12
    modes = {str(p.relative_to(comfy)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_tiny_models_elsewhere_keep_inputs_beside_the_models(tmp_path):
    from liveavatar_pack.cli.tiny_models import inputs_dir

    (tmp_path / "models").mkdir()
    assert inputs_dir(tmp_path / "models") == tmp_path / "models" / "input"  # not a ComfyUI install
    (tmp_path / "main.py").write_text("")
    (tmp_path / "folder_paths.py").write_text("")
    assert inputs_dir(tmp_path / "models") == tmp_path.resolve() / "input"


def test_run_workflow_refuses_a_ui_file_naming_its_api_twin():
    from liveavatar_pack.cli.run_workflow import load_api_workflow

    with pytest.raises(ValueError, match=r"UI-format workflow; use its API-format twin .*api_workflows/liveavatar_single_gpu_api\.json"):
        load_api_workflow(WORKFLOWS / "liveavatar_single_gpu.json")
    assert load_api_workflow(API_WORKFLOWS / "liveavatar_single_gpu_api.json")["10"]["class_type"] == "LiveAvatarSampler"
