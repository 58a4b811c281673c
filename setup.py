"""The compiled part of the build; everything else is declared in pyproject.toml.

The window kernel (streamscore/kernels/_windows.c, see kernels/tiles.py) is optional:
where no C compiler is found the package still installs and reads windows with the
same code in Python, only slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "streamscore.kernels._windows",
            sources=["streamscore/kernels/_windows.c"],
            optional=True,
        )
    ]
)
