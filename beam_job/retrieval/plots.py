"""Pictures with Pillow (no matplotlib): two images side by side with keypoints and RANSAC inliers joined by
lines, and a contact sheet of a query with its top results and their scores.

Keypoint locations are (y, x) pixels of the image passed in (the shards' convention); drawing converts
them to canvas (x, y) through MatchLayout, which tests use to find where things were drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ImageLike = np.ndarray | Image.Image

KEYPOINT_COLOR = (255, 210, 0)  # yellow: every keypoint
INLIER_COLOR = (0, 255, 0)  # green: RANSAC inlier correspondences
OUTLIER_COLOR = (255, 0, 0)  # red: putative matches rejected by RANSAC (optional)
QUERY_BORDER = (30, 120, 255)
VERIFIED_BORDER = (0, 200, 0)
UNVERIFIED_BORDER = (160, 160, 160)
BACKGROUND = (255, 255, 255)


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 HxWx3 arrays or PIL images, got dtype {arr.dtype}")
    return Image.fromarray(arr[..., :3], "RGB")


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


@dataclass(frozen=True)
class MatchLayout:
    """Where each image sits on the canvas: uniform scales and the left offset of image B (pixels)."""

    scale_a: float
    scale_b: float
    offset_b: int
    size: tuple[int, int]  # canvas (width, height)

    def canvas_xy_a(self, yx: np.ndarray) -> np.ndarray:
        """(n, 2) (y, x) in image A -> (n, 2) canvas (x, y)."""
        yx = np.asarray(yx, np.float64).reshape(-1, 2)
        return np.stack([yx[:, 1] * self.scale_a, yx[:, 0] * self.scale_a], axis=1)

    def canvas_xy_b(self, yx: np.ndarray) -> np.ndarray:
        """(n, 2) (y, x) in image B -> (n, 2) canvas (x, y)."""
        yx = np.asarray(yx, np.float64).reshape(-1, 2)
        return np.stack([yx[:, 1] * self.scale_b + self.offset_b, yx[:, 0] * self.scale_b], axis=1)


def draw_matches(
    image_a: ImageLike,
    image_b: ImageLike,
    locations_a: np.ndarray,
    locations_b: np.ndarray,
    matches: np.ndarray,
    inlier_mask: np.ndarray,
    out_path: str | None = None,
    *,
    height: int | None = None,
    max_height: int = 720,
    gap: int = 10,
    draw_keypoints: bool = True,
    draw_outliers: bool = False,
    line_width: int = 2,
    title: str | None = None,
) -> tuple[Image.Image, MatchLayout]:
    """Side-by-side picture: A left, B right, both scaled to one height; keypoints as yellow circles, inlier
    correspondences as green lines (and rejected ones in red when draw_outliers).

    locations_a (n, 2), locations_b (m, 2): (y, x) in pixels of the given images.
    matches (k, 2): rows (index into A, index into B); inlier_mask (k,) bool.
    Writes a PNG to out_path when given (local or gs://). Returns (image, layout).
    """
    a, b = _to_pil(image_a), _to_pil(image_b)
    matches = np.asarray(matches, np.int64).reshape(-1, 2)
    inlier_mask = np.asarray(inlier_mask, bool).reshape(-1)
    if len(inlier_mask) != len(matches):
        raise ValueError(f"inlier_mask has {len(inlier_mask)} entries for {len(matches)} matches")
    h = int(height or min(max(a.height, b.height), max_height))
    sa, sb = h / a.height, h / b.height
    wa, wb = max(1, round(a.width * sa)), max(1, round(b.width * sb))
    canvas = Image.new("RGB", (wa + gap + wb, h), BACKGROUND)
    canvas.paste(a.resize((wa, h), Image.Resampling.BILINEAR), (0, 0))
    canvas.paste(b.resize((wb, h), Image.Resampling.BILINEAR), (wa + gap, 0))
    layout = MatchLayout(sa, sb, wa + gap, canvas.size)
    draw = ImageDraw.Draw(canvas)
    pa_xy = layout.canvas_xy_a(locations_a)
    pb_xy = layout.canvas_xy_b(locations_b)
    if draw_keypoints:
        for x, y in np.concatenate([pa_xy, pb_xy]):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=KEYPOINT_COLOR)
    if draw_outliers:
        for (ia, ib) in matches[~inlier_mask]:
            draw.line([tuple(pa_xy[ia]), tuple(pb_xy[ib])], fill=OUTLIER_COLOR, width=1)
    for (ia, ib) in matches[inlier_mask]:
        (x0, y0), (x1, y1) = pa_xy[ia], pb_xy[ib]
        draw.line([(x0, y0), (x1, y1)], fill=INLIER_COLOR, width=line_width)
        for x, y in ((x0, y0), (x1, y1)):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=INLIER_COLOR)
    text = title if title is not None else f"{int(inlier_mask.sum())} inliers / {len(matches)} putative matches"
    if text:
        font = _font(14)
        box = draw.textbbox((4, 4), text, font=font)
        draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=(0, 0, 0))
        draw.text((4, 4), text, fill=(255, 255, 255), font=font)
    if out_path:
        save_png(canvas, out_path)
    return canvas, layout


@dataclass(frozen=True)
class SheetLayout:
    """Tile geometry of a contact sheet: tile i's image box (left, top, right, bottom) on the canvas."""

    tile_boxes: tuple[tuple[int, int, int, int], ...]
    size: tuple[int, int]


def contact_sheet(
    query_image: ImageLike,
    results: Sequence[tuple[ImageLike, str]],
    out_path: str | None = None,
    *,
    query_caption: str = "query",
    verified: Sequence[bool] | None = None,
    thumb: int = 192,
    columns: int = 5,
    border: int = 4,
    caption_height: int = 34,
    margin: int = 8,
) -> tuple[Image.Image, SheetLayout]:
    """A grid: the query first (blue frame), then each result with its caption (e.g. "#1 id / g=0.83 inl=45").

    results: (image, caption) in final order; captions may hold one newline. verified[i]: green frame when
    True (enough inliers), grey otherwise (default: grey). Each image is fitted into a thumb x thumb box.
    Tile 0 is the query. Writes a PNG when out_path is given. Returns (image, layout).
    """
    tiles = [(query_image, query_caption, QUERY_BORDER)]
    verified = list(verified) if verified is not None else [False] * len(results)
    for (img, cap), ok in zip(results, verified, strict=True):
        tiles.append((img, cap, VERIFIED_BORDER if ok else UNVERIFIED_BORDER))
    cols = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // cols)
    cell_w = thumb + 2 * border + margin
    cell_h = thumb + 2 * border + caption_height + margin
    canvas = Image.new("RGB", (cols * cell_w + margin, rows * cell_h + margin), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    boxes = []
    for i, (img, cap, colour) in enumerate(tiles):
        r, c = divmod(i, cols)
        left, top = margin + c * cell_w, margin + r * cell_h
        draw.rectangle([left, top, left + thumb + 2 * border - 1, top + thumb + 2 * border - 1], fill=colour)
        pil = _to_pil(img)
        pil.thumbnail((thumb, thumb), Image.Resampling.BILINEAR)
        ox = left + border + (thumb - pil.width) // 2
        oy = top + border + (thumb - pil.height) // 2
        inner = [left + border, top + border, left + border + thumb - 1, top + border + thumb - 1]
        draw.rectangle(inner, fill=BACKGROUND)
        canvas.paste(pil, (ox, oy))
        boxes.append((ox, oy, ox + pil.width, oy + pil.height))
        draw.multiline_text((left, top + thumb + 2 * border + 2), cap, fill=(0, 0, 0), font=font, spacing=2)
    if out_path:
        save_png(canvas, out_path)
    return canvas, SheetLayout(tuple(boxes), canvas.size)


def save_png(image: Image.Image, out_path: str) -> str:
    """Save as PNG to a local path (parent folders created) or gs://."""
    import io

    from beam_job import storage

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    storage.write_bytes(out_path, buf.getvalue())
    return out_path
