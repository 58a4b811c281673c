"""The compiled part of the build; everything else is declared in pyproject.toml.

Every compiled part is optional: where no C compiler is found the package still installs.
The feature state then keeps its buckets in the Python twin of the compiled tiles
(streamscore/kernels/_windows.c, see kernels/tiles.py), and the dense kernel
(streamscore/kernels/_dense.c, see kernels/dense.py) leaves onnxruntime models to
onnxruntime, and Score's messages go through protobuf objects (streamscore/server/_wire.c,
see server/wire.py); all only slower (and the state larger).
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
        Extension(
            "streamscore.server._wire",
            sources=["streamscore/server/_wire.c"],
            optional=True,
        ),
    ]
)
