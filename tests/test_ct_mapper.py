"""CTDatasetMapper: windowing, neighbour interpolation, fallback, spacing normalisation, boxes."""

import numpy as np
import pytest

from detectron2.structures import BoxMode

from elixir_d2.data.ct_mapper import (
    CTDatasetMapper,
    CTSliceError,
    hu_to_png16,
    read_hu_slice,
    window_to_uint8_range,
)

from conftest import write_slice

H = W = 32


def _series(root, values, first=1):
    """Slices first.. holding constant HU values[i]; returns the series folder."""
    for i, v in enumerate(values):
        write_slice(root, "000001_01_01", first + i, np.full((H, W), v))
    return f"{root}/Images_png/000001_01_01"


def _record(slice_dir, key, slice_range, intv, spacing=0.8, boxes=((4, 6, 12, 20),)):
    return {
        "file_name": f"{slice_dir}/{key:03d}.png",
        "image_id": 0,
        "height": H,
        "width": W,
        "slice_dir": slice_dir,
        "slice_idx": key,
        "slice_range": slice_range,
        "slice_intv": intv,
        "spacing": spacing,
        "hu_window": (-175, 275),
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0} for b in boxes
        ],
    }


def _mapper(is_train=False, **kw):
    args = dict(
        num_slices=3,
        slice_interval_mm=2.0,
        hu_window=(-1024.0, 3071.0),
        norm_spacing_mm=0.8,
        max_size=512,
        flip_prob=0.0,
    )
    args.update(kw)
    return CTDatasetMapper(is_train, **args)


def test_window_values_at_known_hu():
    hu = np.array([-2000.0, -1024.0, 0.0, 1023.5, 3071.0, 5000.0])
    expect = np.array([0.0, 0.0, 1024 * 255 / 4095, 2047.5 * 255 / 4095, 255.0, 255.0])
    np.testing.assert_allclose(window_to_uint8_range(hu, (-1024, 3071)), expect, rtol=1e-6)


def test_read_hu_slice_subtracts_offset(tmp_path):
    write_slice(str(tmp_path), "s", 1, np.array([[-1000, 0], [40, 1500]]))
    np.testing.assert_array_equal(
        read_hu_slice(f"{tmp_path}/Images_png/s/001.png"), [[-1000, 0], [40, 1500]]
    )


def test_neighbours_when_interval_divides_2mm(tmp_path):
    # 1 mm slices: +-2 mm is exactly 2 slices away
    d = _series(str(tmp_path), [0, 100, 200, 300, 400, 500, 600])
    out = _mapper()(_record(d, 4, (1, 7), 1.0))
    hu = out["image"][:, 0, 0].numpy() * 4095 / 255 - 1024
    np.testing.assert_allclose(hu, [100, 300, 500], atol=1e-3)


def test_neighbours_interpolated_when_interval_does_not_divide(tmp_path):
    # 1.25 mm slices: 2 mm = 1.6 slices -> 0.4 * S[key-1] + 0.6 * S[key-2]
    d = _series(str(tmp_path), [0, 100, 200, 300, 400, 500, 600])
    out = _mapper()(_record(d, 4, (1, 7), 1.25))
    hu = out["image"][:, 0, 0].numpy() * 4095 / 255 - 1024
    np.testing.assert_allclose(hu, [300 - 1.6 * 100, 300, 300 + 1.6 * 100], atol=1e-2)


def test_five_mm_slices_interpolate_toward_key(tmp_path):
    # 5 mm slices: 2 mm = 0.4 slice -> 0.6 key + 0.4 neighbour
    d = _series(str(tmp_path), [0, 1000, 2000])
    out = _mapper()(_record(d, 2, (1, 3), 5.0))
    hu = out["image"][:, 0, 0].numpy() * 4095 / 255 - 1024
    np.testing.assert_allclose(hu, [600, 1000, 1400], atol=1e-2)


def test_missing_neighbour_falls_back_toward_key_and_is_counted(tmp_path):
    d = _series(str(tmp_path), [0, 100, 200], first=1)  # slices 1..3, key 3: no slice 4, 5
    m = _mapper()
    out = m(_record(d, 3, (1, 5), 1.0))
    hu = out["image"][:, 0, 0].numpy() * 4095 / 255 - 1024
    np.testing.assert_allclose(hu, [0, 200, 200], atol=1e-3)  # key+2 -> key+1 missing -> key
    assert out["fallback_slices"] == 1 and m.fallback_slices == 1


def test_nine_slices(tmp_path):
    d = _series(str(tmp_path), [10 * i for i in range(20)])
    out = _mapper(num_slices=9)(_record(d, 10, (1, 20), 2.0))
    hu = out["image"][:, 0, 0].numpy() * 4095 / 255 - 1024
    np.testing.assert_allclose(hu, [10 * (9 + k) for k in range(-4, 5)], atol=1e-2)


def test_spacing_normalisation_scales_image_and_boxes(tmp_path):
    d = _series(str(tmp_path), [0, 0, 0])
    m = _mapper(is_train=True)
    out = m(_record(d, 2, (1, 3), 2.0, spacing=1.6))  # 1.6 mm -> 0.8 mm: x2
    assert tuple(out["image"].shape) == (3, 64, 64)
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor.numpy(), [[8, 12, 24, 40]])
    assert (out["height"], out["width"]) == (H, W)  # original size, for rescaling predictions


def test_longer_side_cap(tmp_path):
    d = _series(str(tmp_path), [0, 0, 0])
    out = _mapper(max_size=48)(_record(d, 2, (1, 3), 2.0, spacing=1.6))
    assert tuple(out["image"].shape) == (3, 48, 48)
    assert "instances" not in out  # test-time: ground truth stays with the evaluator


def test_flip_moves_boxes(tmp_path):
    d = _series(str(tmp_path), [0, 0, 0])
    out = _mapper(is_train=True, flip_prob=1.0, norm_spacing_mm=0)(_record(d, 2, (1, 3), 2.0))
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor.numpy(), [[W - 12, 6, W - 4, 20]])


def test_corrupt_and_8bit_png_named(tmp_path):
    d = _series(str(tmp_path), [0, 0, 0])
    with open(f"{d}/002.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(CTSliceError, match="002.png"):
        _mapper()(_record(d, 2, (1, 3), 2.0))
    from PIL import Image

    Image.fromarray(np.zeros((H, W), np.uint8)).save(f"{d}/002.png")
    with pytest.raises(CTSliceError, match="16-bit"):
        _mapper()(_record(d, 2, (1, 3), 2.0))


def test_size_mismatch_with_annotation(tmp_path):
    d = _series(str(tmp_path), [0, 0, 0])
    rec = _record(d, 2, (1, 3), 2.0)
    rec["height"] = 40
    with pytest.raises(CTSliceError, match="annotation says"):
        _mapper()(rec)


def test_choose_crop_keeps_the_chosen_lesion_whole():
    from elixir_d2.data.ct_mapper import choose_crop

    rng = np.random.RandomState(0)
    box = np.array([[70.0, 10.0, 90.0, 25.0]])
    for _ in range(200):
        x0, y0, w, h = choose_crop(100, 120, 40, box, 1.0, rng)
        assert (w, h) == (40, 40)
        assert x0 <= 70 and x0 + w >= 90 and y0 <= 10 and y0 + h >= 25  # whole lesion inside
        assert 0 <= x0 <= 120 - 40 and 0 <= y0 <= 100 - 40  # inside the image


def test_choose_crop_centres_a_lesion_larger_than_the_crop_and_shrinks_to_small_images():
    from elixir_d2.data.ct_mapper import choose_crop

    rng = np.random.RandomState(1)
    x0, y0, w, h = choose_crop(100, 100, 20, np.array([[30.0, 40.0, 70.0, 60.0]]), 1.0, rng)
    assert (x0, y0, w, h) == (40, 40, 20, 20)  # centre (50, 50) minus half the crop
    assert choose_crop(30, 50, 64, np.zeros((0, 4)), 1.0, rng) == (0, 0, 50, 30)


def test_uniform_crops_cover_the_image():
    from elixir_d2.data.ct_mapper import choose_crop

    rng = np.random.RandomState(2)
    starts = {
        choose_crop(12, 12, 10, np.array([[0.0, 0.0, 2.0, 2.0]]), 0.0, rng)[:2] for _ in range(400)
    }
    assert starts == {(x, y) for x in range(3) for y in range(3)}  # every position, lesion or not


def test_training_crop_moves_boxes_and_inference_sees_whole_slices(tmp_path):
    d = _series(tmp_path, [0.0, 10.0, 20.0])
    rec = _record(d, 2, (1, 3), 2.0, spacing=0.8, boxes=((4, 6, 12, 20),))
    np.random.seed(0)
    out = _mapper(is_train=True, crop_size=16, crop_lesion_prob=1.0)(rec)
    assert tuple(out["image"].shape[1:]) == (16, 16)
    (box,) = out["instances"].gt_boxes.tensor.numpy()
    # whole, shifted
    assert box[2] - box[0] == pytest.approx(8) and box[3] - box[1] == pytest.approx(14)
    assert 0 <= box[0] and box[2] <= 16 and 0 <= box[1] and box[3] <= 16
    test_out = _mapper(is_train=False, crop_size=16, crop_lesion_prob=1.0)(rec)
    assert tuple(test_out["image"].shape[1:]) == (H, W)


def test_opencv_resize_matches_bilinear_half_pixel_reference():
    import torch
    import torch.nn.functional as F

    from elixir_d2.data.ct_mapper import CVResizeTransform

    img = np.random.RandomState(3).rand(20, 30, 3).astype(np.float32) * 255
    got = CVResizeTransform(20, 30, 33, 47).apply_image(img)
    ref = (
        F.interpolate(
            torch.from_numpy(img).permute(2, 0, 1)[None],
            size=(33, 47),
            mode="bilinear",
            align_corners=False,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    np.testing.assert_allclose(got, ref, atol=0.02)


def test_hu_to_png16_is_deeplesions_hu_plus_32768():
    hu = np.array([-40000.0, -32768, -1024, -0.5, 0.4, 0.5, 1.5, 40, 3071, 32767, 40000])
    # rounded half to even, + 32768, clipped to what uint16 holds
    expected = [0, 0, 31744, 32768, 32768, 32768, 32770, 32808, 35839, 65535, 65535]
    out = hu_to_png16(hu)
    assert out.dtype == np.uint16 and out.tolist() == expected
    assert hu_to_png16(np.array([-1024, 0, 3071], dtype=np.int16)).tolist() == [31744, 32768, 35839]
    assert hu_to_png16(np.array([-128, 127], dtype=np.int8)).tolist() == [32640, 32895]
    with pytest.raises(ValueError, match="NaN or infinity"):
        hu_to_png16(np.array([0.0, np.nan]))


def test_hu_to_png16_reads_back_through_read_hu_slice(tmp_path):
    from PIL import Image

    hu = np.array([[-1024, -1000, 0], [40, 1000, 3071]], dtype=np.int16)
    Image.fromarray(hu_to_png16(hu)).save(tmp_path / "001.png")
    np.testing.assert_array_equal(read_hu_slice(str(tmp_path / "001.png")), hu.astype(np.float32))
