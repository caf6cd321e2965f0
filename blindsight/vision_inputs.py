"""The index tensors of a Qwen vision tower, in numpy.

numpy versions of ``transformers.vision_utils``' ``get_vision_position_ids``,
``get_vision_cu_seqlens`` and ``get_vision_window_index`` (Qwen2.5-VL's
windowed attention), equal to them element for element (int64 here; transformers
returns int32 boundaries). The exported ``vision.onnx`` takes these as inputs
because the tower computes them with Python loops over ``image_grid_thw``.
"""

from __future__ import annotations

import numpy as np

from blindsight import families


def _grid(grid_thw) -> np.ndarray:
    return np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)


def vision_cu_seqlens(grid_thw) -> np.ndarray:
    """[segments + 1]: boundaries of the attention segments, one per frame (h * w patches each)."""
    grid = _grid(grid_thw)
    seqlens = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int64)


def vision_position_ids(grid_thw, spatial_merge_size: int) -> np.ndarray:
    """[patches, 2] (row, column) of every patch, in merge-block order, repeated per frame."""
    m = int(spatial_merge_size)
    out = [np.zeros((0, 2), np.int64)]
    for t, h, w in _grid(grid_thw).tolist():
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int64)


def vision_window_index(grid_thw, spatial_merge_size: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL: (window_index [merged tokens], cu_window_seqlens [windows + 1]).

    The merged tokens of each frame are cut into windows of window_size pixels
    (window_size // merge // patch merged tokens a side); window_index puts them in
    window order, cu_window_seqlens bounds the windows in patches (repeated
    boundaries of empty windows dropped, as ``unique_consecutive`` does).
    """
    m = int(spatial_merge_size)
    win = int(window_size) // m // int(patch_size)
    index_out, cu = [], [0]
    offset = 0
    for t, h, w in _grid(grid_thw).tolist():
        lh, lw = h // m, w // m
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        pad_h, pad_w = win - lh % win, win - lw % win
        nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum((2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index_out.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * m * m + cu[-1]).tolist())
        offset += t * lh * lw
    cu = np.asarray(cu, np.int64)
    keep = np.concatenate([[True], cu[1:] != cu[:-1]])
    index = np.concatenate(index_out) if index_out else np.zeros(0, np.int64)
    return index.astype(np.int64), cu[keep]


def unpad_patches(pixel_values, image_grid_thw):
    """``pixel_values`` with each image's patches back to back.

    onnxruntime-genai's Qwen processor (0.18.0) pads every image's patches to the
    largest image's count when the images of a prompt differ in size: image i's
    patches are rows ``i * largest`` onward, then zeros (measured). Its per-image
    vision loop slices them for a tower that takes ``image_grid_thw``; a tower that
    takes the index tensors instead gets the rows it reads here. Rows already back to
    back (one image, or images of one size) are returned as they are."""
    grid = _grid(image_grid_thw)
    counts = np.prod(grid, axis=1)
    rows = np.asarray(pixel_values).shape[0]
    if rows == int(counts.sum()):
        return pixel_values
    largest = int(counts.max()) if counts.size else 0
    if rows != largest * len(counts):
        raise ValueError(f"pixel_values has {rows} rows; image_grid_thw {grid.tolist()} asks for {int(counts.sum())} "
                         f"back to back or {largest * len(counts)} padded per image")
    return np.concatenate([pixel_values[i * largest:i * largest + int(n)] for i, n in enumerate(counts)])


def qwen_vision_feeds(family: str, vision_config: dict, pixel_values, image_grid_thw) -> dict[str, np.ndarray]:
    """Every input of a Qwen ``vision.onnx`` from the processor's outputs.

    ``vision_config`` is template.json's ``vision`` entry (spatial_merge_size,
    window_size, patch_size).
    """
    merge = int(vision_config["spatial_merge_size"])
    feeds = {
        "pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32),
        "vision_position_ids": vision_position_ids(image_grid_thw, merge),
        "cu_seqlens": vision_cu_seqlens(image_grid_thw),
    }
    if families.get(family).windowed_vision:
        feeds["window_index"], feeds["cu_window_seqlens"] = vision_window_index(
            image_grid_thw, merge, int(vision_config["window_size"]), int(vision_config["patch_size"]))
    return feeds
