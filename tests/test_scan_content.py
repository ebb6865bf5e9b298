"""What a scan holds, checked where it is read (issue 33): orientations and positions of a DICOM
series' slices, pixel data against Rows x Columns, multi-frame files, every PNG slice's size,
NaN / infinite voxels, HU plausibility and spacing ranges. Every input is built here."""

import os
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from elixir_d2.inference import volume_io
from elixir_d2.inference.hu_check import check_hu
from elixir_d2.inference.volume_io import (
    CTInputError,
    read_dicom_series,
    read_nifti,
    read_png_series,
)

from conftest import write_slice
from test_predict_io import phantom, write_dicom_series, write_nifti

AXIAL = (1, 0, 0, 0, 1, 0)


def write_series(folder, vol, positions, orientations, spacing=(0.7, 0.7)):
    """One CT file per slice, each with its own ImagePositionPatient / ImageOrientationPatient
    (stored HU + 1024, RescaleIntercept -1024)."""
    os.makedirs(folder, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z, hu in enumerate(vol):
        img = sitk.GetImageFromArray(hu.astype(np.int16))
        img.SetSpacing(spacing)
        tags = {
            "0008|0060": "CT",
            "0028|1052": "-1024",
            "0028|1053": "1",
            "0020|0032": "\\".join(f"{v:g}" for v in positions[z]),
            "0020|0037": "\\".join(f"{v:g}" for v in orientations[z]),
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{z}",
            "0020|0013": str(z + 1),
        }
        for k, v in tags.items():
            img.SetMetaData(k, v)
        writer.SetFileName(os.path.join(folder, f"IM{z:04d}.dcm"))
        writer.Execute(img)
    return str(folder)


def patch_element(path, tag: bytes, old: bytes, new: bytes) -> None:
    """Replace the value of one implicit-VR little-endian element (what SimpleITK writes)."""
    data = open(path, "rb").read()
    head = tag + struct.pack("<I", len(old)) + old
    assert data.count(head) == 1, (path, head)
    open(path, "wb").write(data.replace(head, tag + struct.pack("<I", len(new)) + new))


# ----------------------------------------------------------------------------- 2: orientations
def test_two_scouts_in_one_series_are_refused(tmp_path):
    # A sagittal and a coronal scout (8 slices each) sharing one series UID.
    vol = phantom(slices=16, size=40)
    sag, cor = (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 0, -1)
    # Positions even along the first slice's normal: only the orientations give it away.
    positions = [(-2.5 * i, -20, 50) for i in range(16)]
    folder = write_series(tmp_path / "scouts", vol, positions, [sag] * 8 + [cor] * 8)
    with pytest.raises(
        CTInputError,
        match=r"scouts: slices differ in orientation: "
        r"IM0000\.dcm has ImageOrientationPatient "
        r"\(0, 1, 0, 0, 0, -1\) but IM0008\.dcm has "
        r"\(1, 0, 0, 0, 0, -1\)",
    ):
        read_dicom_series(folder, "scouts")


def test_slices_flipped_in_plane_are_refused(tmp_path):
    # Every other slice rotated 180 degrees in-plane: same normal, same even positions.
    vol = phantom(slices=6)
    flipped = (-1, 0, 0, 0, -1, 0)
    folder = write_series(
        tmp_path / "flip",
        vol,
        [(0, 0, 2.5 * z) for z in range(6)],
        [AXIAL if z % 2 == 0 else flipped for z in range(6)],
    )
    with pytest.raises(
        CTInputError,
        match=r"flip: slices differ in orientation: IM0000\.dcm .* "
        r"but IM0001\.dcm has \(-1, 0, 0, 0, -1, 0\)",
    ):
        read_dicom_series(folder, "flip")


def test_slice_positions_off_the_stack_axis_are_refused(tmp_path):
    # Evenly spaced along the normal, but slice 3 lies 30 mm to the side of the others.
    positions = [(0, 0, 2.5 * z) for z in range(6)]
    positions[3] = (30, 0, 7.5)
    folder = write_series(tmp_path / "shifted", phantom(), positions, [AXIAL] * 6)
    with pytest.raises(
        CTInputError,
        match=r"shifted: slice positions do not form one stack: "
        r"IM0003\.dcm lies 30 mm off the line",
    ):
        read_dicom_series(folder, "shifted")


def test_uniform_in_plane_drift_reads_with_a_warning(tmp_path):
    # Gantry tilt: each slice 0.5 mm further along y; read as an unsheared stack, said so.
    folder = write_series(
        tmp_path / "tilt", phantom(), [(0, 0.5 * z, 2.5 * z) for z in range(6)], [AXIAL] * 6
    )
    v = read_dicom_series(folder, "tilt")
    assert v.hu.shape == (6, 40, 40) and v.slice_interval == pytest.approx(2.5)
    assert len(v.warnings) == 1 and "0.5 mm in-plane per slice" in v.warnings[0]


def test_malformed_orientation_is_refused(tmp_path):
    # SimpleITK will not write this orientation: the tag of the last file is patched.
    folder = write_series(
        tmp_path / "skew", phantom(), [(0, 0, 2.5 * z) for z in range(6)], [AXIAL] * 6
    )
    patch_element(
        os.path.join(folder, "IM0005.dcm"),
        b"\x20\x00\x37\x00",
        b"1\\0\\0\\0\\1\\0 ",
        b"1\\0\\0\\1\\0\\0 ",
    )
    with pytest.raises(
        CTInputError,
        match=r"skew: IM0005\.dcm has ImageOrientationPatient "
        r"\(1, 0, 0, 1, 0, 0\): not two orthogonal unit",
    ):
        read_dicom_series(folder, "skew")


# ----------------------------------------------------------------------------- 3: pixel data
def test_dicom_pixel_data_shorter_than_rows_columns_is_refused(tmp_path):
    # Headers say 128 x 128, each file holds 64 x 64 pixels: GDCM zero-fills the rest.
    folder = write_dicom_series(tmp_path / "short", phantom(slices=4, size=64))
    for f in os.listdir(folder):
        for tag in (b"\x28\x00\x10\x00", b"\x28\x00\x11\x00"):  # Rows, Columns
            patch_element(
                os.path.join(folder, f), tag, struct.pack("<H", 64), struct.pack("<H", 128)
            )
    with pytest.raises(
        CTInputError,
        match=r"short[/\\]IM0000\.dcm: pixel data holds 8192 bytes "
        r"where 128 x 128 pixels of 16 bits need 32768",
    ):
        read_dicom_series(folder, "short")


def test_multi_frame_dicom_is_named_as_such(tmp_path):
    img = sitk.GetImageFromArray((phantom() + 1024).astype(np.uint16))
    img.SetMetaData("0008|0060", "CT")
    (tmp_path / "enhanced").mkdir()
    sitk.WriteImage(img, str(tmp_path / "enhanced" / "volume.dcm"))
    with pytest.raises(
        CTInputError,
        match=r"enhanced: volume\.dcm is a multi-frame DICOM file "
        r"\(6 frames\), which is not supported",
    ):
        read_dicom_series(str(tmp_path / "enhanced"), "enhanced")


# ----------------------------------------------------------------------------- 4: PNG sizes
def _no_decoding(monkeypatch):
    monkeypatch.setattr(
        volume_io,
        "read_hu_slice",
        lambda path: pytest.fail(f"{path} decoded before the size checks"),
    )


def test_png_voxel_cap_counts_every_slice_before_decoding(tmp_path, monkeypatch):
    root = str(tmp_path / "DL")
    write_slice(root, "s", 1, np.full((64, 64), -1000, np.int16))
    for i in (2, 3):
        write_slice(root, "s", i, np.full((512, 512), -1000, np.int16))
    folder = os.path.join(root, "Images_png", "s")
    _no_decoding(monkeypatch)
    with pytest.raises(
        CTInputError,
        match=r"s[/\\]002\.png: 512 x 512 px, where 001\.png is "
        r"64 x 64",
    ):
        read_png_series(folder, "s", spacing=0.8, slice_interval=2.0, max_voxels=100_000)


def test_png_slices_below_the_minimum_size_are_refused(tmp_path, monkeypatch):
    root = str(tmp_path / "DL")
    for i in (1, 2, 3):
        write_slice(root, "tiny", i, np.full((1, 1), 40, np.int16))
    _no_decoding(monkeypatch)
    with pytest.raises(
        CTInputError,
        match=r"tiny[/\\]001\.png: 1 x 1 px slices; a CT slice needs "
        r"at least 16 px a side",
    ):
        read_png_series(
            os.path.join(root, "Images_png", "tiny"), "tiny", spacing=0.8, slice_interval=2.0
        )


# ----------------------------------------------------------------------------- 5: NaN / inf
def test_nifti_of_nan_voxels_is_refused_with_a_count(tmp_path):
    vol = np.full((12, 64, 64), np.nan, np.float32)
    vol[0, 0, 0] = 40.0
    path = write_nifti(tmp_path / "nan.nii.gz", vol)
    with pytest.raises(
        CTInputError,
        match=r"nan\.nii\.gz: 49,151 of 49,152 voxels are NaN or "
        r"infinite",
    ):
        read_nifti(path, "nan")


def test_a_few_non_finite_voxels_read_as_zero_with_a_warning(tmp_path):
    # ITK's NIfTI reader turns NaN / inf into 0 without a word: at most 0.01% is let through so,
    # and said.
    vol = phantom(slices=8, size=128).astype(np.float32)  # 131,072 voxels
    vol[2, 20, 20], vol[3, 5, 5] = np.nan, np.inf
    v = read_nifti(write_nifti(tmp_path / "few.nii.gz", vol), "few")
    assert v.hu[2, 20, 20] == v.hu[3, 5, 5] == 0
    assert v.warnings == [
        f"{tmp_path / 'few.nii.gz'}: 2 of 131,072 voxels are NaN or infinite; "
        "read as 0 HU (at most 0.01% are)"
    ]
    vol[4] = np.nan  # 12.5%: refused
    with pytest.raises(CTInputError, match=r"many\.nii\.gz: 16,386 of 131,072 voxels are NaN"):
        read_nifti(write_nifti(tmp_path / "many.nii.gz", vol), "many")


# ----------------------------------------------------------------------------- 6: HU plausibility
def test_mr_with_one_negative_voxel_is_not_ct(tmp_path):
    # An MR: intensities around 8935, one negative voxel (what let anatomical.nii through).
    vol = np.random.default_rng(0).normal(8935, 1500, (8, 40, 40)).astype(np.int16)
    vol[0, 0, 0] = -5
    with pytest.raises(
        CTInputError,
        match=r"mr\.nii\.gz: not a CT volume in Hounsfield units "
        r"\(99th percentile [0-9.e+]+ HU is above 4095",
    ):
        read_nifti(write_nifti(tmp_path / "mr.nii.gz", vol), "mr")


def test_dicom_rescale_slope_1e30_is_not_ct(tmp_path):
    folder = write_dicom_series(tmp_path / "slope", phantom())
    for f in os.listdir(folder):
        patch_element(os.path.join(folder, f), b"\x28\x00\x53\x10", b"1 ", b"1e30")
    with pytest.raises(
        CTInputError,
        match=r"slope: not a CT volume in Hounsfield units \(99th "
        r"percentile 1\.\d+e\+33 HU is above 4095",
    ):
        read_dicom_series(folder, "slope")


@pytest.mark.parametrize("shift, what", [(1024, "HU stored with an offset"), (None, "a 0/1 mask")])
def test_values_without_air_or_fat_are_not_ct(shift, what):
    vol = phantom().astype(np.float32)
    vol = vol + shift if shift is not None else (vol > 0).astype(np.float32)
    with pytest.raises(
        CTInputError,
        match=r"x: not a CT volume in Hounsfield units \(0\.00% of "
        r"voxels at or below -100 HU",
    ):
        check_hu("x", vol)


def test_real_ct_value_layouts_pass():
    # Outside-the-field padding at -3024 on 22% of voxels, metal at 20000 HU on 0.5%.
    vol = phantom(slices=4, size=100).astype(np.float32)
    yy, xx = np.mgrid[:100, :100]
    vol[:, (yy - 50) ** 2 + (xx - 50) ** 2 > 50**2] = -3024
    vol[:, 50, :50] = 20000
    check_hu("ct", vol)  # no error


# ----------------------------------------------------------------------------- 12: spacing
def test_implausible_spacing_is_refused(tmp_path):
    path = write_nifti(tmp_path / "huge.nii.gz", phantom(), spacing=(1e30, 0.8, 2.5))
    with pytest.raises(
        CTInputError,
        match=r"huge\.nii\.gz: voxel spacing 1e\+30 mm is outside "
        r"the plausible 0\.05\.\.50 mm",
    ):
        read_nifti(path, "huge")
    thick = write_dicom_series(
        tmp_path / "thick", phantom(), z_positions=[80.0 * z for z in range(6)]
    )
    with pytest.raises(CTInputError, match=r"thick: slice interval 80 mm is outside"):
        read_dicom_series(thick, "thick")
    root = str(tmp_path / "DL")
    for i in (1, 2, 3):
        write_slice(root, "p", i, phantom()[0])
    with pytest.raises(CTInputError, match=r"p: pixel spacing 0\.001 mm is outside"):
        read_png_series(
            os.path.join(root, "Images_png", "p"), "p", spacing=0.001, slice_interval=2.0
        )
