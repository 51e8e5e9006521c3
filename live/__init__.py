"""Live mode: ``python -m liveavatar live`` serves a page and a WebSocket API on the streaming engine.

Audio arrives in chunks (a microphone, a TTS stream); video with sound leaves block by block as it is
decoded. Modules: :mod:`.protocol` (messages, PCM decoding), :mod:`.session` (the paced audio timeline
and the generation thread), :mod:`.muxer` (fragmented MP4), :mod:`.engine` (models, one generation at
a time), :mod:`.server` (aiohttp routes), :mod:`.client` (``live-client``), ``static/index.html``.

Why fragmented MP4 over Media Source Extensions, not WebRTC:

* latency: our unit of output is a block of 12 frames (480 ms) that appears all at once after a
  look-ahead; WebRTC's advantage (tens of ms of jitter buffer, per-frame pacing, loss concealment
  over UDP) is below that granularity, and on loopback/LAN TCP adds ~nothing. The fMP4 path adds
  one x264 ``zerolatency`` encode (ms at these sizes) and no container delay (one fragment per
  frame duration), so a block's first frame reaches the page ~encode time after it is decoded.
* browser support: MSE with H.264 + AAC in fMP4 plays in Chrome, Edge, Firefox and Safari (iOS 17.1+
  via ManagedMediaSource); it needs only a WebSocket, no STUN/TURN, ICE or DTLS, and runs through any
  HTTP proxy. WebRTC would need a media stack server-side (aiortc + PyAV, heavy dependencies) for
  RTP packetisation and congestion control we do not need on loopback.
* the same byte stream is a valid MP4: the Python client writes what it received straight to a file.
* what we give up: WebRTC's adaptive bitrate on lossy networks; MSE's player may buffer a little
  (the page does not seek to the live edge; generation that falls behind is reported instead).

WebSocket API (``ws://HOST:PORT/ws``; the README's "Live mode" section shows a session):

Client -> server. Text frames are JSON control messages, binary frames are PCM:
  ``{"type": "start", "sample_rate": R, "channels": 1|2, "format": "s16le"|"f32le", "image": B64?}``
  then binary PCM chunks of any length (whole sample frames; any rate 8..192 kHz, resampled to 16 kHz
  as one stream), ``{"type": "end_utterance"}`` (no more audio for now: pad the look-ahead with
  silence instead of waiting), ``{"type": "image", "image": B64}`` (new reference from the next block;
  same size), ``{"type": "stop"}`` (stop, flush, ``end``). One message is at most 16 MiB.
Server -> client:
  ``{"type": "accepted", width, height, fps, block_ms, lookahead_ms, latency_floor_ms, models}``;
  ``{"type": "init", "mime": "video/mp4; codecs=\\"avc1.…,mp4a.40.2\\"", ...}`` then binary frames: the
  init segment, then media segments (``moof``+``mdat``), in order; their concatenation is an MP4;
  ``{"type": "block", index, first_frame, frames, audio_s, client_audio_s, idle, latency_ms, late_ms,
  behind_ms, fps, encode_ms, since_start_ms, queued_audio_ms}`` when a block's first frame has left the
  encoder (``latency_ms``: from the arrival of the audio at the block's first frame; ``behind_ms`` > 0:
  generation is behind real time by that much); ``{"type": "error", "message"}`` (bad message: the
  session goes on); ``{"type": "busy", "message"}`` then close code 1013 (another session is
  generating on this model); ``{"type": "end", "frames", "error"}`` (the session is over).
"""
