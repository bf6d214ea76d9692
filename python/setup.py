"""pyproject.toml says everything but one thing: when tools/build-wheel.sh has staged the
binary in maskaudit/_bin, the wheel is platform-specific (platlib, py3-none-linux_x86_64, which
auditwheel then makes manylinux), not pure Python. Any Python 3: the binary is no extension
module."""

from pathlib import Path

from setuptools import setup

options = {}
if (Path(__file__).resolve().parent / "maskaudit" / "_bin" / "maskaudit").is_file():
    from setuptools.command.bdist_wheel import bdist_wheel
    from setuptools.dist import Distribution

    class WithBinary(Distribution):
        def has_ext_modules(self):
            return True  # installs into platlib, tags a platform

    class PlatformWheel(bdist_wheel):
        def get_tag(self):
            return "py3", "none", super().get_tag()[2]

    options = {"distclass": WithBinary, "cmdclass": {"bdist_wheel": PlatformWheel}}

setup(**options)
