"""The latent size shared by the DiT, sampler, placement, planner and distributed unit tests.

Non-square with an odd number of token columns (4 x 5 tokens per latent frame): a swap of rows
and columns anywhere (a RoPE grid, a cache shape, a patchify) changes a result or a shape here,
where a square size would hide it. FramePack's 2x/4x/8x pooled grids stay non-empty (10 // 8 = 1).
"""
LATENT_H, LATENT_W = 8, 10  # latent rows, columns: 64 x 80 pixels
