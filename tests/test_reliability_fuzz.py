"""Fuzzing (hypothesis): the DL_info.csv row parser and the genotype loader either parse their
input or raise the project's own error type (DeepLesionFormatError, GenotypeError), never another
exception."""

import os

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from elixir_d2.data.deeplesion import (
    DL_INFO_COLUMNS,
    DeepLesionFormatError,
    parse_dl_info_row,
    read_dl_info,
)
from elixir_d2.modeling.alb.genotype import (
    Genotype,
    GenotypeError,
    genotype_from_dict,
    load_genotype,
)
from elixir_d2.modeling.alb.ops import get_search_space

from conftest import dl_row

FUZZ = settings(
    max_examples=int(os.environ.get("ELIXIR_FUZZ_EXAMPLES", 150)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# ----------------------------------------------------------------------------- DL_info rows
VALID = dl_row()
NUMBERISH = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "-0",
            "0",
            "1.5",
            "2.0",
            "-1",
            "9",
            "12",
            "abc",
            "1,2",
            "1, 2, 3, 4",
            "3, 1, 2, 0",
            "1,,2",
            "0x10",
            "1_000",
            "\u0661",
            "1e-400",
            "\x00",
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=9).map(
        lambda v: ", ".join(repr(x) for x in v)
    ),
    st.text(max_size=30),
)


@st.composite
def rows(draw):
    """A valid row with some columns replaced by arbitrary text or number-like strings, or gone."""
    row = dict(VALID)
    for col in draw(st.lists(st.sampled_from(DL_INFO_COLUMNS), unique=True, max_size=6)):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            del row[col]
        elif kind == 1:
            row[col] = None  # what csv.DictReader gives for a short row
        else:
            row[col] = draw(NUMBERISH)
    return row


@FUZZ
@given(rows())
@example(dict(VALID, Key_slice_index="1e400"))  # int(float("inf")) raises OverflowError
@example(dict(VALID, Slice_range="1, inf"))
@example(dict(VALID, Image_size="inf, 64"))
@example(dict(VALID, File_name="000001_01_01_\u0661.png"))  # a non-ASCII digit
def test_dl_info_row_parses_or_raises_deeplesion_format_error(row):
    try:
        les = parse_dl_info_row(row, "fuzz.csv, row 2")
    except DeepLesionFormatError as e:
        assert "fuzz.csv, row 2" in str(e)
        return
    # what parses is usable: a non-empty box that meets the image, finite numbers
    x1, y1, x2, y2 = les["bbox"]
    h, w = les["size"]
    assert x2 > x1 and y2 > y1 and x1 < w and y1 < h and x2 > 0 and y2 > 0
    assert les["split"] in (1, 2, 3) and les["lesion_type"] in (-1, *range(1, 9))
    assert min(les["spacing"]) > 0


@FUZZ
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_dl_info_file_parses_or_raises_deeplesion_format_error(tmp_path, data):
    path = os.path.join(str(tmp_path), "DL_info.csv")
    with open(path, "wb") as f:
        f.write(",".join(DL_INFO_COLUMNS).encode() + b"\n" + data)
    try:
        read_dl_info(path)
    except DeepLesionFormatError as e:
        assert path in str(e)


# ----------------------------------------------------------------------------- genotypes
OPS = get_search_space("elixir")
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.floats(allow_nan=True),
    st.sampled_from(OPS + ["conv_9x9", "none", "elixir", "darts", ""]),
    st.text(max_size=8),
)
ANY = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=9)
        | st.dictionaries(SCALARS.filter(lambda v: v == v), inner, max_size=5)
    ),
    max_leaves=30,
)
PAIR = st.tuples(st.sampled_from(OPS + ["conv_9x9"]), st.integers(-1, 6)).map(list) | ANY


@st.composite
def genotype_dicts(draw):
    """Near-valid genotypes (8 pairs each, a few edges / ops / keys wrong) and arbitrary data."""
    if draw(st.booleans()):
        return draw(ANY)
    data = {
        "space": draw(st.sampled_from(["elixir", "darts"]) | ANY),
        "branches": draw(st.just(4) | ANY),
        "normal": draw(st.lists(PAIR, min_size=6, max_size=9)),
        "reduce": draw(st.lists(PAIR, min_size=6, max_size=9)),
    }
    for key in draw(
        st.lists(
            st.sampled_from(["space", "branches", "normal", "reduce"]), unique=True, max_size=2
        )
    ):
        del data[key]
    if draw(st.integers(0, 5)) == 0:
        data[draw(SCALARS.filter(lambda v: v == v))] = draw(ANY)  # an extra key of any type
    return data


@FUZZ
@given(genotype_dicts())
def test_genotype_dict_loads_or_raises_genotype_error(data):
    try:
        g = genotype_from_dict(data, source="fuzz.yaml")
    except GenotypeError as e:
        assert "fuzz.yaml" in str(e)
        return
    assert isinstance(g, Genotype)
    assert g.validate("again") is g  # what loads is valid


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        genotype_dicts().map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode()),
    )
)
def test_genotype_file_loads_or_raises_genotype_error(tmp_path, data):
    path = os.path.join(str(tmp_path), "genotype.yaml")
    with open(path, "wb") as f:
        f.write(data)
    try:
        load_genotype(path)
    except GenotypeError as e:
        assert path in str(e)
