"""Install the ElixirNet detectron2 extension (package ``elixir_d2``).

detectron2 itself is not listed in ``install_requires``: it has no release on PyPI, and
``scripts/install.sh`` installs it by the route of docs/design.md, Installation and dependencies.
"""

from setuptools import find_packages, setup

DICOM_SR = ["highdicom>=0.28"]  # the "dicom-sr" extra (tested with 0.28.2)

setup(
    name="elixir_d2",
    version="0.1.0",
    description="ElixirNet (AAAI 2020) lesion detection in CT as a detectron2 extension",
    packages=find_packages(include=["elixir_d2", "elixir_d2.*"]),
    # The case report's page templates, CSS and JS (elixir_d2/inference/report.py).
    package_data={"elixir_d2.inference": ["report_assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy",
        "pyyaml",
        "Pillow<10",
        "matplotlib",
        "pycocotools",
        "SimpleITK",
        "opencv-python-headless",
        "tqdm",
        "fvcore",
        "iopath",
    ],
    extras_require={
        # ruff pinned: `make lint` (.ci/run) must give the same verdict on every machine.
        # selenium: tests/test_report_html.py drives headless Chromium (scripts/install.sh).
        "dev": ["pytest", "pytest-timeout", "hypothesis", "ruff==0.17.6", "selenium", *DICOM_SR],
        # predict_net.py --dicom-sr writes its DICOM SR with highdicom (which brings pydicom 3);
        # optional for inference, in dev for tests/test_dicom_sr.py.
        "dicom-sr": DICOM_SR,
    },
)
