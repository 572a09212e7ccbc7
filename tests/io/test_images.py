"""Image writing: uint8 conversion, grids and the streamed .npz."""

import numpy as np
import torch
from PIL import Image

from diffusevae.io.images import NpzStreamWriter, make_grid, save_grid, side_by_side, to_uint8


def test_to_uint8_maps_the_range_ends_and_clamps():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    assert to_uint8(x)[0, :, :, 0].tolist() == [[0, 128], [255, 255]]


def test_grid_places_images_row_by_row(tmp_path):
    imgs = np.stack([np.full((2, 2, 1), v, np.uint8) for v in (10, 20, 30)])
    grid = make_grid(imgs, nrow=2, pad=1, pad_value=0)
    assert grid.shape == (7, 7, 1)
    assert grid[1, 1, 0] == 10 and grid[1, 4, 0] == 20 and grid[4, 1, 0] == 30
    save_grid(imgs, tmp_path / "g.png", nrow=2, scale=3)
    assert Image.open(tmp_path / "g.png").size == (3 * 10, 3 * 10)  # 2 px padding


def test_side_by_side_interleaves():
    a, b = -torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    pairs = side_by_side(a, b)
    assert [int(p.max()) for p in pairs] == [0, 255, 0, 255]


def test_npz_stream_writer_fills_rows_in_any_batching(tmp_path):
    path = tmp_path / "s.npz"
    with NpzStreamWriter(path, 5) as w:
        w.write(0, images=np.arange(3, dtype=np.uint8)[:, None], z=np.ones((3, 2), np.float32))
        w.write(3, images=np.arange(3, 5, dtype=np.uint8)[:, None],
                z=np.zeros((2, 2), np.float32))
    data = np.load(path)
    assert data["images"][:, 0].tolist() == [0, 1, 2, 3, 4]
    assert data["z"].sum() == 6
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # temp parts removed
