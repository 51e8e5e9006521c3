"""Double of comfy_api.latest.io: schemas and types with the attributes the tests inspect."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class FolderType(str, Enum):
    input = "input"
    output = "output"
    temp = "temp"


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


class _Input:
    io_type = None
    widget = False

    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, **extra):
        self.id, self.display_name, self.optional, self.tooltip, self.default = id, display_name, optional, tooltip, default
        self.extra = extra


class _Output:
    io_type = None

    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def _comfytype(io_type: str, widget: bool = False):
    inp = type(f"{io_type}_Input", (_Input,), {"io_type": io_type, "widget": widget})
    out = type(f"{io_type}_Output", (_Output,), {"io_type": io_type})
    return type(io_type, (), {"io_type": io_type, "Input": inp, "Output": out})


def Custom(io_type: str):
    return _comfytype(io_type)


class Int(_comfytype("INT", True)):
    class Input(_Input):
        io_type, widget = "INT", True

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                     max=None, step=None, control_after_generate=None, **kw):
            super().__init__(id, display_name, optional, tooltip, lazy, default)
            self.min, self.max, self.step = min, max, step


class Float(_comfytype("FLOAT", True)):
    class Input(Int.Input):
        io_type = "FLOAT"


class String(_comfytype("STRING", True)):
    class Input(_Input):
        io_type, widget = "STRING", True

        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False,
                     placeholder=None, default=None, **kw):
            super().__init__(id, display_name, optional, tooltip, lazy, default)
            self.multiline = multiline


class Boolean(_comfytype("BOOLEAN", True)):
    class Input(_Input):
        io_type, widget = "BOOLEAN", True


class Combo(_comfytype("COMBO", True)):
    class Input(_Input):
        io_type, widget = "COMBO", True

        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None, default=None, **kw):
            super().__init__(id, display_name, optional, tooltip, lazy, default)
            self.options = list(options or [])


Image = _comfytype("IMAGE")
Audio = _comfytype("AUDIO")
Video = _comfytype("VIDEO")
Conditioning = _comfytype("CONDITIONING")
Clip = _comfytype("CLIP")
Vae = _comfytype("VAE")
Model = _comfytype("MODEL")
AudioEncoder = _comfytype("AUDIO_ENCODER")
AudioEncoderOutput = _comfytype("AUDIO_ENCODER_OUTPUT")


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = None
    description: str = ""
    is_output_node: bool = False
    is_experimental: bool = False
    not_idempotent: bool = False


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError


class NodeOutput:
    def __init__(self, *args: Any, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index):
        return self.args[index]
