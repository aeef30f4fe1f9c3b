"""Pictures: the match figure (keypoints + RANSAC inlier lines) and the contact sheet, checked pixel by pixel,
and both made by the CLI from shards whose local features are OpenCV SIFT on real photos."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from beam_job.retrieval import cli, geometry, plots, synthetic
from beam_job.retrieval import index as ix

GRAY = (128, 128, 128)


def _gray(h, w):
    return np.full((h, w, 3), 128, np.uint8)


def _pixel(img, xy):
    return img.getpixel((int(round(xy[0])), int(round(xy[1]))))


def _near(img, xy, colour, radius=1):
    """True when `colour` is within `radius` pixels of xy (lines are 2 px wide, anti-aliasing free)."""
    x, y = int(round(xy[0])), int(round(xy[1]))
    return any(img.getpixel((x + dx, y + dy)) == colour
               for dx in range(-radius, radius + 1) for dy in range(-radius, radius + 1))


def test_match_picture_draws_inlier_lines_and_keypoints_where_they_belong(tmp_path):
    a, b = _gray(200, 300), _gray(100, 120)  # B is scaled x2 to A's height
    loc_a = np.array([[150, 40], [60, 200], [180, 250], [120, 100], [30, 280]], np.float32)  # (y, x)
    loc_b = np.array([[70, 20], [30, 100], [90, 60], [50, 10], [20, 110]], np.float32)
    matches = np.array([[0, 0], [1, 1], [2, 2], [3, 3]])
    inliers = np.array([True, True, False, False])
    out = str(tmp_path / "sub" / "match.png")
    img, layout = plots.draw_matches(a, b, loc_a, loc_b, matches, inliers, out, title="")
    assert os.path.exists(out)
    with Image.open(out) as saved:
        assert saved.size == img.size == (300 + 10 + 240, 200) == layout.size
        assert saved.format == "PNG"
        disk = saved.convert("RGB")
    assert layout.scale_b == 2.0 and layout.offset_b == 310
    pa_, pb_ = layout.canvas_xy_a(loc_a), layout.canvas_xy_b(loc_b)
    np.testing.assert_allclose(pb_[0], [310 + 20 * 2, 70 * 2])
    for i in (0, 1):  # inlier lines: green all along, endpoints marked
        for t in (0.25, 0.5, 0.75):
            assert _near(disk, pa_[i] + t * (pb_[i] - pa_[i]), plots.INLIER_COLOR)
        assert _pixel(disk, pa_[i]) == plots.INLIER_COLOR and _pixel(disk, pb_[i]) == plots.INLIER_COLOR
    mid = (pa_[2] + pb_[2]) / 2  # outlier: no line unless asked
    assert _pixel(disk, mid) in (GRAY, (255, 255, 255))
    x, y = pa_[4]  # a keypoint with no match: yellow ring, untouched centre
    assert _pixel(disk, (x + 2, y)) == plots.KEYPOINT_COLOR and _pixel(disk, (x, y)) == GRAY
    assert _pixel(disk, (305, 100)) == (255, 255, 255)  # the gap between the images
    with_outliers, _ = plots.draw_matches(a, b, loc_a, loc_b, matches, inliers, draw_outliers=True, title="")
    assert _near(with_outliers, mid, plots.OUTLIER_COLOR)
    with pytest.raises(ValueError, match="inlier_mask"):
        plots.draw_matches(a, b, loc_a, loc_b, matches, inliers[:2])


def test_contact_sheet_shows_query_then_results_with_frames_and_captions(tmp_path):
    colours = [(200, 30, 30), (30, 30, 200), (240, 240, 0)]
    results = [(np.full((60, 90, 3), c, np.uint8), f"#{i + 1} img{i}\ng=0.{9 - i}00 inl={40 - 20 * i}")
               for i, c in enumerate(colours)]
    out = str(tmp_path / "sheet.png")
    img, layout = plots.contact_sheet(_gray(80, 80), results, out, verified=[True, False, True], thumb=100, columns=2)
    with Image.open(out) as saved:
        assert saved.size == img.size == layout.size
        disk = saved.convert("RGB")
    # 4 tiles in 2 columns -> 2 rows of (100 + 8 border + 34 caption + 8 margin) + 8
    assert layout.size == (2 * (100 + 8 + 8) + 8, 2 * (100 + 8 + 34 + 8) + 8)
    assert len(layout.tile_boxes) == 4
    frames = [plots.QUERY_BORDER, plots.VERIFIED_BORDER, plots.UNVERIFIED_BORDER, plots.VERIFIED_BORDER]
    contents = [GRAY, *colours]
    for (left, top, right, bottom), frame, colour in zip(layout.tile_boxes, frames, contents, strict=True):
        assert _pixel(disk, ((left + right) / 2, (top + bottom) / 2)) == colour  # the thumbnail itself
        cx = (left + right) / 2
        frame_top = top - (100 - (bottom - top)) // 2 - 2  # inside the 4-px frame above the thumb box
        assert _pixel(disk, (cx, frame_top)) == frame
        caption = np.asarray(disk.crop((left - 6, bottom + 6, right + 6, bottom + 40)))
        if bottom - top == 100:  # square thumbnails leave no padding: the caption starts under the frame
            assert (caption.sum(axis=2) < 200).any()  # dark text pixels
    assert (np.asarray(disk)[-3:, :, :] == 255).all()  # white margin


@pytest.fixture(scope="module")
def sift_index(tmp_path_factory):
    """Shards whose local features are SIFT on real photos: astronaut, a warped astronaut, coffee, camera."""
    import cv2
    from skimage import data

    root = tmp_path_factory.mktemp("sift")
    astro = data.astronaut()
    matrix_yx = synthetic.affine_yx(angle_deg=12, scale=0.85, shear=0.0, ty=40, tx=60)
    warped = cv2.warpAffine(astro, geometry.swap_matrix_xy_yx(matrix_yx), (astro.shape[1], astro.shape[0]))
    images = {"astro": astro, "astro_warped": warped, "coffee": data.coffee(),
              "camera": np.stack([data.camera()] * 3, axis=-1)}
    rng = np.random.default_rng(0)
    g = synthetic.unit_rows(rng, 1, 2048)[0]
    sift = cv2.SIFT_create(nfeatures=500)
    rows = []
    for name, arr in images.items():
        path = str(root / f"{name}.png")
        Image.fromarray(arr).save(path)
        kps, desc = sift.detectAndCompute(cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY), None)
        noise = synthetic.unit_rows(rng, 1, 2048)[0]
        glob = g + (0.3 if name.startswith("astro") else 1.0) * noise
        rows.append({"image_id": name, "path": path, "global_descriptor": glob / np.linalg.norm(glob),
                     "original_height": arr.shape[0], "original_width": arr.shape[1],
                     "locations": np.array([[k.pt[1], k.pt[0]] for k in kps]),
                     "descriptors": desc / np.linalg.norm(desc, axis=1, keepdims=True)})
    synthetic.write_shard(str(root / "features" / "part-0.parquet"),
                          synthetic.rows_to_table(rows, metadata=synthetic.default_metadata()))
    ix.build_index(str(root / "features"), str(root / "index"))
    return root


def test_cli_draws_the_match_figure_and_contact_sheet_from_shards(sift_index, capsys):
    root = sift_index
    out = str(root / "pictures" / "astro_match.png")
    assert cli.main(["draw-matches", str(root / "index"), "astro_warped", "astro", "--out", out,
                     "--ratio", "0.8", "--distance_threshold", "10"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inliers"] >= 100 and info["inliers"] <= info["putative"]
    with Image.open(out) as img:
        assert img.size == (512 + 10 + 512, 512)
        px = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert (px == plots.INLIER_COLOR).all(axis=1).sum() > 2000  # many green inlier lines drawn
    assert cli.main(["draw-matches", str(root / "index"), "astro", "coffee", "--out", str(root / "pictures" / "no.png"),
                     "--ratio", "0.8", "--distance_threshold", "10"]) == 0
    assert json.loads(capsys.readouterr().out)["inliers"] < 0.1 * info["inliers"]
    sheet = str(root / "pictures" / "sheet.png")
    assert cli.main(["contact-sheet", str(root / "index"), "astro_warped", "--out", sheet, "--k", "3",
                     "--ratio", "0.8", "--distance_threshold", "10"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == 3
    with Image.open(sheet) as img:
        assert img.size == (4 * (192 + 8 + 8) + 8, 192 + 8 + 34 + 8 + 8)
