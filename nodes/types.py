"""The pack's own ComfyUI types (only for our objects; native types everywhere else)."""
from __future__ import annotations

from comfy_api.latest import io

Model = io.Custom("LIVEAVATAR_MODEL")  # a loaded DiT (nodes.models.LiveAvatarModel)
Placement = io.Custom("LIVEAVATAR_PLACEMENT")  # model_loaders.placement.PlacementConfig
VAE = io.Custom("LIVEAVATAR_VAE")  # nodes.models.LiveAvatarVAE
TextEncoder = io.Custom("LIVEAVATAR_TEXT_ENCODER")  # nodes.models.LiveAvatarTextEncoder
AudioEncoder = io.Custom("LIVEAVATAR_AUDIO_ENCODER")  # nodes.models.LiveAvatarAudioEncoder
Text = io.Custom("LIVEAVATAR_TEXT")  # nodes.conditioning.TextConditioning
AudioCond = io.Custom("LIVEAVATAR_AUDIO")  # nodes.conditioning.AudioConditioning
Reference = io.Custom("LIVEAVATAR_REFERENCE")  # nodes.conditioning.ReferenceConditioning
Latents = io.Custom("LIVEAVATAR_LATENTS")  # nodes.stream.LatentStream (streaming handle)
# Reserved for the distributed nodes: an object with the BlockBackend protocol of nodes.stream
Pipeline = io.Custom("LIVEAVATAR_PIPELINE")

CATEGORY = "LiveAvatar"
