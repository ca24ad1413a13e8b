"""The optional C writer of the served LaFAM PNG (``handlers/_png.c``); everything else is in pyproject.toml.

``optional=True``: without a C compiler the package installs all the same and ``handlers.encode`` writes the
PNG in Python (the same pixels, slower right after a forward pass).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "handlers._png",
            ["handlers/_png.c"],
            # no fused multiply-add: the grey levels must round as numpy's float32 multiply then add do
            extra_compile_args=["-O2", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
