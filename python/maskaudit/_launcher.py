"""The `maskaudit` command of the wheel (`make wheel`): checks that this environment's torch is
the one the binary was linked against, then replaces itself with the binary.

The binary (maskaudit/_bin/maskaudit) links libtorch dynamically and finds it through its
runpath, `$ORIGIN/../../torch/lib`: the torch package beside maskaudit in the same
site-packages. A torch of another version would load and then fail on undefined symbols, so
its version is read from the package metadata first (without importing torch, which takes
seconds). Arguments, standard streams and the exit status are the binary's own.
"""

import os
import sys

from . import __version__
# The torch release the binary is built against (Makefile's TORCH_VERSION, checked by
# tools/build-wheel.sh against pyproject.toml's pin).
TORCH = "2.11"


def _torch_version():
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _same_release(version: str) -> bool:
    # "2.11.0+cu130" and "2.11.1" are 2.11; "2.1" and "2.110.0" are not.
    return version.split("+")[0].split(".")[:2] == TORCH.split(".")


def _torch_lib():
    from importlib import util

    spec = util.find_spec("torch")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "lib")


def main() -> int:
    binary = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bin", "maskaudit")
    if not os.path.isfile(binary):
        print("maskaudit: this install of the Python package has no binary (a checkout's "
              "`pip install ./python`): install the wheel `make wheel` builds, or run "
              "./target/release/maskaudit", file=sys.stderr)
        return 2
    version = _torch_version()
    lib = _torch_lib() if version else None
    if version is None or not _same_release(version) or lib is None:
        have = f"torch {version}" if version else "no torch"
        print(f'maskaudit {__version__} needs torch {TORCH}.*; this environment has {have}: '
              f'pip install "torch=={TORCH}.*"', file=sys.stderr)
        return 2
    env = os.environ
    beside = os.path.join(os.path.dirname(binary), os.pardir, os.pardir, "torch", "lib")
    if not os.path.exists(beside) or not os.path.samefile(beside, lib):
        # torch sits in another site-packages (a --system-site-packages venv, user site):
        # the runpath misses it, so name its lib/ for the dynamic loader.
        env = dict(env)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    sys.stdout.flush()
    os.execve(binary, sys.argv, env)
    return 0  # not reached: execve replaces this process


if __name__ == "__main__":
    sys.exit(main())
