"""The compiled part of the build; everything else is declared in pyproject.toml.

Both kernels are optional: where no C compiler is found the package still installs.
The window kernel (streamscore/kernels/_windows.c, see kernels/tiles.py) then reads
windows with the same code in Python, and the dense kernel (streamscore/kernels/
_dense.c, see kernels/dense.py) leaves onnxruntime models to onnxruntime; both only
slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "streamscore.kernels._windows",
            sources=["streamscore/kernels/_windows.c"],
            optional=True,
        ),
        Extension(
            "streamscore.kernels._dense",
            sources=["streamscore/kernels/_dense.c"],
            optional=True,
        ),
    ]
)
