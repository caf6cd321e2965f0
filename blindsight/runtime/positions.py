"""Position ids of a prompt in numpy: Qwen's 3-row M-RoPE and plain 1-D positions.

A port of transformers' ``Qwen2VLModel.get_rope_index`` for images (videos are
not supported): text tokens advance all three rows together; the tokens of an
image with merged grid (t, h, w) take rows (start + t_index, start + h_index,
start + w_index), and the text after it resumes at start + max(h, w).
"""

from __future__ import annotations

import numpy as np


def mrope_position_ids(input_ids, image_token_id: int, image_grid_thw, spatial_merge_size: int):
    """Return (position_ids int64 [3, S], delta) for one prompt.

    ``delta`` = max position + 1 - S: decode step n (0-based) of a prompt of S
    tokens has position S + n + delta in all three rows.
    """
    ids = np.asarray(input_ids).reshape(-1)
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    is_image = ids == image_token_id
    pos = np.zeros((3, ids.size), dtype=np.int64)
    # runs of equal modality, as transformers groups them
    edges = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges]) if ids.size else np.zeros(0, dtype=np.int64)
    ends = np.concatenate([edges, [ids.size]]) if ids.size else np.zeros(0, dtype=np.int64)
    current, image = 0, 0
    for start, end in zip(starts.tolist(), ends.tolist()):
        if not is_image[start]:
            pos[:, start:end] = np.arange(end - start) + current
            current += end - start
            continue
        if image >= len(grids):
            raise ValueError(f"more image-token runs in the prompt than the {len(grids)} image grids given")
        t, h, w = (int(v) for v in grids[image])
        h, w = h // spatial_merge_size, w // spatial_merge_size
        if t * h * w != end - start:
            raise ValueError(f"image {image}: {end - start} image tokens in the prompt, its grid gives {t * h * w}")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        pos[:, start:end] = np.stack([tt, hh, ww]).reshape(3, -1) + current
        current += max(h, w)
        image += 1
    if image != len(grids):
        raise ValueError(f"{len(grids)} image grids given but the prompt holds {image} images")
    delta = int(pos.max()) + 1 - ids.size if ids.size else 0
    return pos, delta


def decode_position_ids(step_position: int, rows: int) -> np.ndarray:
    """Position ids of one new token: [rows, 1, 1] for M-RoPE (rows=3), [1, 1] for 1-D."""
    if rows == 1:
        return np.full((1, 1), step_position, dtype=np.int64)
    return np.full((rows, 1, 1), step_position, dtype=np.int64)
