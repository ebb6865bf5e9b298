"""Reading CT inputs for inference: NIfTI, DICOM series, DeepLesion folders, and bad input."""

import os

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from elixir_d2.data.ct_mapper import CTSliceError
from elixir_d2.inference import discover_cases
from elixir_d2.inference.volume_io import (
    CTInputError,
    check_context,
    context_slices_needed,
    read_case,
    read_dicom_series,
    read_nifti,
    read_png_series,
)

from conftest import dl_row, write_dl_info, write_slice

# Fake identifiers written into DICOM headers: none may reach any output.
FAKE_PHI = {
    "0010|0010": "ZZFAKE^PATIENTNAME",
    "0010|0020": "PIDQ98765X",
    "0010|0030": "19010203",
    "0008|0050": "ACCN55501",
}


def phantom(slices=6, size=40, lesion=(2, 4, 10, 22, 14, 30), lesion_hu=120):
    """(S, H, W) int16 HU: air, a soft-tissue body, and a box lesion (z0, z1, y0, y1, x0, x1) of
    ``lesion_hu`` on slices z0..z1-1; every slice also carries its index in pixel (0, 0)."""
    vol = np.full((slices, size, size), -1000, np.int16)
    vol[:, 4 : size - 4, 4 : size - 4] = 40
    z0, z1, y0, y1, x0, x1 = lesion
    vol[z0:z1, y0:y1, x0:x1] = lesion_hu
    vol[:, 0, 0] = np.arange(slices) * 10 - 1000
    return vol


def write_nifti(path, vol, spacing=(0.8, 0.8, 2.5), origin=(0.0, 0.0, 0.0), direction=None):
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return str(path)


def write_dicom_series(
    folder,
    vol,
    spacing=(0.7, 0.7),
    z_positions=None,
    modality="CT",
    origin=(-10.0, -20.0),
    intercept=-1024,
    phi=FAKE_PHI,
):
    """One file per slice; values are HU, stored as HU - intercept (the writer applies the inverse
    rescale, the reader the rescale)."""
    os.makedirs(folder, exist_ok=True)
    z_positions = z_positions if z_positions is not None else [2.5 * z for z in range(len(vol))]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z, hu in enumerate(vol):
        img = sitk.GetImageFromArray(hu.astype(np.int16))
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        tags = {
            "0008|0060": modality,
            "0028|1052": str(intercept),
            "0028|1053": "1",
            "0020|0032": f"{origin[0]}\\{origin[1]}\\{z_positions[z]}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": "2.5",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{z}",
            "0020|0013": str(z + 1),
            **phi,
        }
        for k, v in tags.items():
            img.SetMetaData(k, v)
        writer.SetFileName(os.path.join(folder, f"IM{z:04d}.dcm"))
        writer.Execute(img)
    return str(folder)


def write_png_series(root, series, vol, first=1):
    for i, hu in enumerate(vol):
        write_slice(root, series, first + i, hu)
    return os.path.join(root, "Images_png", series)


# ----------------------------------------------------------------------------- NIfTI
def test_nifti_hu_spacing_and_geometry(tmp_path):
    vol = phantom()
    path = write_nifti(tmp_path / "ct.nii.gz", vol, spacing=(0.8, 0.9, 2.5), origin=(5.0, 6.0, 7.0))
    v = read_nifti(path, "ct")
    np.testing.assert_array_equal(v.hu, vol.astype(np.float32))
    assert v.spacing == pytest.approx((0.8, 0.9)) and v.slice_interval == pytest.approx(2.5)
    assert v.slice_numbers == list(range(6)) and v.kind == "nifti"
    # pixel (x=3, y=2) of slice 4 has its centre at continuous coordinate (3.5, 2.5)
    assert v.physical_point(3.5, 2.5, 4) == pytest.approx((5 + 3 * 0.8, 6 + 2 * 0.9, 7 + 4 * 2.5))


def test_nifti_is_reoriented_to_lps(tmp_path):
    # x axis stored pointing right (R: direction -1): reorientation flips the columns back.
    vol = phantom()
    path = write_nifti(tmp_path / "flipped.nii.gz", vol, direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    v = read_nifti(path, "flipped")
    np.testing.assert_array_equal(v.hu, vol[:, :, ::-1].astype(np.float32))
    np.testing.assert_allclose(v.direction, np.eye(3))


def test_nifti_bad_inputs_are_named(tmp_path):
    two_d = write_nifti(tmp_path / "slice.nii.gz", phantom()[0], spacing=(0.8, 0.8))
    with pytest.raises(CTInputError, match=r"slice\.nii\.gz: a 2-D image"):
        read_nifti(two_d, "slice")
    mr = write_nifti(tmp_path / "mr.nii", np.abs(phantom()).astype(np.int16))
    with pytest.raises(CTInputError, match=r"mr\.nii: not a CT volume in Hounsfield units"):
        read_nifti(mr, "mr")
    rgb = sitk.GetImageFromArray(np.zeros((4, 8, 8, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(CTInputError, match=r"rgb\.nii\.gz: not a CT volume \(3 components"):
        read_nifti(str(tmp_path / "rgb.nii.gz"), "rgb")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CTInputError, match=r"broken\.nii\.gz: unreadable"):
        read_nifti(str(tmp_path / "broken.nii.gz"), "broken")


def test_nifti_without_spacing(tmp_path):
    import gzip
    import struct

    path = write_nifti(tmp_path / "nospacing.nii", phantom(), spacing=(0.7, 0.7, 2.0))
    data = bytearray((tmp_path / "nospacing.nii").read_bytes())
    # NIfTI-1 pixdim[1:4]
    assert struct.unpack("<3f", data[80:92]) == pytest.approx((0.7, 0.7, 2.0))
    data[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)
    (tmp_path / "nospacing.nii").write_bytes(bytes(data))
    with pytest.raises(CTInputError, match=r"nospacing\.nii: missing spacing"):
        read_nifti(path, "nospacing")
    (tmp_path / "nospacing.nii.gz").write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(CTInputError, match=r"nospacing\.nii\.gz: missing spacing"):
        read_nifti(str(tmp_path / "nospacing.nii.gz"), "nospacing")


# ----------------------------------------------------------------------------- DICOM
def test_dicom_series_hu_from_rescale_and_spacing_from_headers(tmp_path):
    vol = phantom()
    folder = write_dicom_series(tmp_path / "series", vol, spacing=(0.7, 0.7))
    # The files store HU + 1024 (RescaleIntercept -1024): the HU below come from the rescale.
    raw = np.frombuffer(
        (tmp_path / "series" / "IM0003.dcm").read_bytes()[-40 * 40 * 2 :], "<i2"
    ).reshape(40, 40)
    np.testing.assert_array_equal(raw, vol[3].astype(np.int32) + 1024)
    v = read_dicom_series(folder, "series")
    np.testing.assert_array_equal(v.hu, vol.astype(np.float32))
    assert v.spacing == pytest.approx((0.7, 0.7)) and v.slice_interval == pytest.approx(2.5)
    assert v.origin == pytest.approx((-10.0, -20.0, 0.0))
    # Nothing read from the headers but geometry and pixels.
    assert not any(p in repr(v.__dict__) for p in FAKE_PHI.values())


def test_dicom_series_sorted_by_position(tmp_path):
    # Files named in reverse order of their positions: slice order follows ImagePositionPatient.
    vol = phantom()
    folder = write_dicom_series(
        tmp_path / "rev", vol, z_positions=[2.5 * (5 - z) for z in range(6)]
    )
    v = read_dicom_series(folder, "rev")
    np.testing.assert_array_equal(v.hu[:, 0, 0], vol[::-1, 0, 0])


def test_dicom_errors_name_the_folder(tmp_path):
    mr = write_dicom_series(tmp_path / "mr_series", phantom(), modality="MR")
    with pytest.raises(CTInputError, match=r"mr_series: not a CT series \(Modality MR\)"):
        read_dicom_series(mr, "mr")
    gap = write_dicom_series(tmp_path / "gappy", phantom(), z_positions=[0, 2.5, 5, 9, 11.5, 14])
    with pytest.raises(CTInputError, match=r"gappy: inconsistent slice spacing"):
        read_dicom_series(gap, "gappy")
    one = write_dicom_series(tmp_path / "single", phantom()[:1])
    with pytest.raises(CTInputError, match=r"single: a single DICOM slice is a 2-D image"):
        read_dicom_series(one, "single")


# ----------------------------------------------------------------------------- DeepLesion
def test_deeplesion_folder_spacing_from_dl_info(tmp_path):
    root = str(tmp_path / "DeepLesion")
    folder = write_png_series(root, "000001_01_01", phantom(), first=1)
    write_dl_info(root, [dl_row("000001_01_01_003.png", spacing=(0.66, 0.66, 1.25), size=(40, 40))])
    cases, _ = discover_cases(folder)
    v = read_case(cases[0])
    assert (cases[0].kind, v.name) == ("deeplesion", "000001_01_01")
    assert v.spacing == pytest.approx((0.66, 0.66)) and v.slice_interval == pytest.approx(1.25)
    assert v.slice_numbers == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(v.hu, phantom().astype(np.float32))
    # Explicit values win over DL_info.csv.
    assert read_case(cases[0], spacing=0.5, slice_interval=5.0).slice_interval == 5.0


def test_key_slice_reads_only_its_neighbourhood(tmp_path):
    root = str(tmp_path / "DeepLesion")
    write_png_series(root, "000002_01_01", phantom(slices=12, lesion=(0, 0, 0, 0, 0, 0)), first=1)
    cases, _ = discover_cases(os.path.join(root, "Images_png", "000002_01_01", "006.png"))
    v = read_case(cases[0], spacing=0.8, slice_interval=1.0, context_mm=2.0)
    assert v.key_slices == [6] and v.slice_numbers == [3, 4, 5, 6, 7, 8, 9]  # +- (2 mm / 1 mm + 1)
    assert v.series_range == (1, 12)


def test_png_folder_errors(tmp_path):
    folder = write_png_series(str(tmp_path / "DL"), "000003_01_01", phantom())
    with pytest.raises(CTInputError, match=r"000003_01_01: missing spacing"):
        read_png_series(folder, "x")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(os.path.join(folder, "003.png"))
    with pytest.raises(CTSliceError, match=r"003\.png: expected a 16-bit"):
        read_png_series(folder, "x", spacing=0.8, slice_interval=2.0)
    with pytest.raises(CTInputError, match=r"009\.png: no such key slice"):
        read_png_series(folder, "x", key_slice=9, spacing=0.8, slice_interval=2.0)


# ----------------------------------------------------------------------------- context
@pytest.mark.parametrize("interval,need", [(1.0, 5), (1.25, 5), (2.0, 3), (5.0, 3), (0.5, 9)])
def test_context_slices_needed(interval, need):
    # +-2 mm reaches 2 mm / interval slices; interpolation needs the next whole slice.
    assert context_slices_needed([-2.0, 0.0, 2.0], interval) == need


def test_too_few_slices_for_the_context(tmp_path):
    v = read_nifti(
        write_nifti(tmp_path / "short.nii.gz", phantom(slices=4), spacing=(0.8, 0.8, 1.0)), "short"
    )
    with pytest.raises(
        CTInputError, match=r"short\.nii\.gz: 4 slice\(s\) at 1 mm; .* needs at least 5"
    ):
        check_context(v, [-2.0, 0.0, 2.0])
    check_context(v, [-1.0, 0.0, 1.0])  # 3 slices suffice at +-1 mm


# ----------------------------------------------------------------------------- discovery
def test_discover_folder_of_cases(tmp_path):
    (tmp_path / "cases").mkdir()
    write_nifti(tmp_path / "cases" / "b_volume.nii.gz", phantom())
    write_dicom_series(tmp_path / "cases" / "a_dicom", phantom())
    write_png_series(str(tmp_path / "cases" / "dl"), "000004_01_01", phantom())
    (tmp_path / "cases" / "notes.txt").write_text("not CT", encoding="utf-8")
    cases, ignored = discover_cases(str(tmp_path / "cases"))
    assert [(c.name, c.kind) for c in cases] == [
        ("a_dicom", "dicom"),
        ("b_volume", "nifti"),
        ("000004_01_01", "deeplesion"),
    ]
    assert ignored == [str(tmp_path / "cases" / "notes.txt")]
    with pytest.raises(CTInputError, match="no such file"):
        discover_cases(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTInputError, match="no CT input found"):
        discover_cases(str(tmp_path / "empty"))
    with pytest.raises(CTInputError, match=r"notes\.txt: unsupported input"):
        discover_cases(str(tmp_path / "cases" / "notes.txt"))
