"""The installed package must hold every subpackage: a non-editable install ships only what pyproject lists."""

import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_subpackage():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {"nanfuse." + ".".join(init.parent.relative_to(ROOT / "nanfuse").parts)
               for init in (ROOT / "nanfuse").rglob("__init__.py")}
    on_disk = {name.rstrip(".") for name in on_disk}
    on_disk |= {"nanfuse.kernels"} if (ROOT / "kernels" / "__init__.py").exists() else set()
    assert on_disk <= listed, f"missing from pyproject packages: {sorted(on_disk - listed)}"
