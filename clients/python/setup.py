"""Generates the protobuf module from stream.proto while building.

Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO = HERE / "stream.proto"


class BuildWithProto(build_py):
    def run(self) -> None:
        super().run()
        out = Path(self.build_lib) / "tickstream_client" / "_proto"
        generate(out)


def generate(out: Path) -> None:
    from grpc_tools import protoc  # build-system requirement

    out.mkdir(parents=True, exist_ok=True)
    (out / "__init__.py").write_text('"""Generated from proto/stream.proto at build time."""\n')
    include = os.path.dirname(protoc.__file__) + "/_proto"
    args = [
        "protoc",
        f"-I{PROTO.resolve().parent}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        PROTO.resolve().name,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


setup(cmdclass={"build_py": BuildWithProto})
