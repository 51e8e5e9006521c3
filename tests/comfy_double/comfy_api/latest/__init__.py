"""Double of comfy_api.latest: ComfyExtension, io, ui, InputImpl."""
from . import io, ui  # noqa: F401


class ComfyExtension:
    async def on_load(self) -> None:
        pass

    async def get_node_list(self):
        raise NotImplementedError


class VideoFromFile:
    def __init__(self, file):
        self.file = file

    def get_stream_source(self):
        return self.file


class InputImpl:
    VideoFromFile = VideoFromFile
