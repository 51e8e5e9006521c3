"""Consumers of the latent handle: decode to IMAGE + AUDIO, or stream straight into an MP4.

Save Video never holds more than one block's frames (12 at a time): any length fits in memory.
Decode returns IMAGE, which ComfyUI keeps whole in RAM as float32 (704 x 384 x 3 x 4 bytes = 3.24 MB
a frame, ~81 MB a second at 25 fps, ~4.9 GB a minute): use it for short clips or further image processing.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from . import runtime, types


class StreamProgress:
    """ComfyUI's bar over the stream's DiT calls (``steps`` per block: 16 per clip at 4 steps), never going back;
    each decoded block adds its last frame as the preview."""

    def __init__(self, stream):
        self.stream, self.done = stream, 0
        self.bar = runtime.Progress(stream.calls_total)

    def calls(self, n: int) -> None:
        if n > self.done:
            self.done = n
            self.bar(n)

    def decoded(self, chunk) -> None:
        self.done = max(self.done, chunk.blocks_done * self.stream.cfg.steps)
        self.bar(self.done, chunk.frames[-1])


def soundtrack_for_video(stream) -> tuple[torch.Tensor, int]:
    """The soundtrack [C, T] cut (or zero-padded) to the video's length, starting with frame 0."""
    wave, rate = stream.soundtrack.waveform, stream.soundtrack.sample_rate
    n = round(stream.total_frames / stream.cfg.fps * rate)
    if wave.shape[-1] >= n:
        return wave[..., :n], rate
    return torch.nn.functional.pad(wave, (0, n - wave.shape[-1])), rate


class Decode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarDecode",
            display_name="LiveAvatar Decode",
            category=types.CATEGORY,
            description="Runs the sampler and decodes every block to IMAGE frames (+ the soundtrack as AUDIO). All frames "
                        "stay in RAM as float32 (3.24 MB each at 704x384: ~81 MB per second of video, ~4.9 GB per "
                        "minute); for long videos use 'LiveAvatar Save Video'.",
            inputs=[
                types.VAE.Input("vae", tooltip="The Wan 2.1 VAE (streaming decoder)."),
                types.Latents.Input("latents", tooltip="From 'LiveAvatar Clip Sampler'."),
            ],
            outputs=[io.Image.Output(display_name="images"), io.Audio.Output(display_name="audio")],
        )

    @classmethod
    def execute(cls, vae, latents) -> io.NodeOutput:
        progress = StreamProgress(latents)
        vae.load()
        out = torch.empty(latents.total_frames, latents.height, latents.width, 3, dtype=torch.float32)
        with runtime.run_guard(), torch.inference_mode():
            for chunk in latents.frames(vae.vae, progress=progress.calls):
                n = chunk.frames.shape[0]
                out[chunk.first_frame:chunk.first_frame + n] = chunk.frames.float() / 255.0
                progress.decoded(chunk)
        wave, rate = soundtrack_for_video(latents)
        return io.NodeOutput(out, {"waveform": wave[None].clone(), "sample_rate": rate})


class SaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarSaveVideo",
            display_name="LiveAvatar Save Video",
            category=types.CATEGORY,
            description="Runs the sampler and streams every decoded block into an H.264 MP4 with the soundtrack in ComfyUI's "
                        "output folder; memory stays flat for any length. If the run is interrupted or fails, the frames "
                        "made so far stay playable in '<name>.partial.mp4'.",
            inputs=[
                types.VAE.Input("vae", tooltip="The Wan 2.1 VAE (streaming decoder)."),
                types.Latents.Input("latents", tooltip="From 'LiveAvatar Clip Sampler'."),
                io.String.Input("filename_prefix", default="LiveAvatar/video",
                                tooltip="File name prefix in the output folder (may contain sub-folders); a counter and "
                                        ".mp4 are appended."),
                io.Int.Input("crf", default=18, min=0, max=51,
                             tooltip="H.264 quality: lower is better and bigger (18 is visually near-lossless, 23 is "
                                     "x264's default)."),
            ],
            outputs=[io.Video.Output(display_name="video")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, vae, latents, filename_prefix, crf) -> io.NodeOutput:
        from comfy_api.latest import InputImpl

        from ..liveavatar.video import Mp4Writer

        path, name, subfolder = runtime.save_path(filename_prefix, latents.width, latents.height)
        progress = StreamProgress(latents)
        wave, rate = soundtrack_for_video(latents)
        vae.load()
        with runtime.run_guard(), torch.inference_mode():
            with Mp4Writer(path, fps=latents.cfg.fps, audio=wave, sample_rate=rate, crf=crf) as writer:
                for chunk in latents.frames(vae.vae, progress=progress.calls):
                    writer.write(chunk.frames)
                    progress.decoded(chunk)
        saved = ui.SavedResult(name, subfolder, io.FolderType.output)
        return io.NodeOutput(InputImpl.VideoFromFile(str(path)), ui=ui.PreviewVideo([saved]))


NODES = [Decode, SaveVideo]
