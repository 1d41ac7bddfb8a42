import os
import shutil
import sys

import pytest

from megatron_lite.testing import free_port


@pytest.fixture(scope="session")
def launcher_env():
    """`launcher_env(**variables)`: the environment for a script that calls the deepspeed CLI:
    this interpreter's bin first on PATH (the launcher runs ranks with the python it was started
    with) and a rendezvous port of its own, plus `variables`."""
    bin_dir = os.path.dirname(sys.executable)
    if shutil.which("deepspeed", path=bin_dir) is None:
        pytest.fail(f"the deepspeed launcher is not installed next to {sys.executable}")

    def make(**variables):
        return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"],
                    MASTER_PORT=str(free_port()), **variables)
    return make
