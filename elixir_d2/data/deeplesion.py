"""DeepLesion: DL_info.csv parsing, key-slice records, DatasetCatalog registration."""
from __future__ import annotations

# The 18 columns of DeepLesion's DL_info.csv, in file order.
DL_INFO_COLUMNS = (
    "File_name",
    "Patient_index",
    "Study_index",
    "Series_ID",
    "Key_slice_index",
    "Measurement_coordinates",
    "Bounding_boxes",
    "Lesion_diameters_Pixel_",
    "Normalized_lesion_location",
    "Coarse_lesion_type",
    "Possibly_noisy",
    "Slice_range",
    "Spacing_mm_px_",
    "Image_size",
    "DICOM_windows",
    "Patient_gender",
    "Patient_age",
    "Train_Val_Test",
)

# Coarse_lesion_type 1..8 (paper Table 4 abbreviations in brackets).
LESION_TYPES = (
    "bone",  # BN
    "abdomen",  # AB
    "mediastinum",  # ME
    "liver",  # LV
    "lung",  # LU
    "kidney",  # KD
    "soft tissue",  # ST
    "pelvis",  # PV
)
LESION_TYPE_ABBREV = ("BN", "AB", "ME", "LV", "LU", "KD", "ST", "PV")
