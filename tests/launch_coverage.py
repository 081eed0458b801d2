"""Under NANFUSE_CHECK_LAUNCHES=1 (set by .ci/compat), the run fails unless its tests launched every Triton
kernel from every launcher: a named subset of the suite must still cover every kernel when kernels or launchers
are added. Launchers are the functions that call `launch.run()` (found in the source, so a new one is covered
without a list to update); kernels are the `@triton.jit` functions named `*_kernel` in nanfuse.kernels.
"""

import ast
import importlib
import pathlib
import pkgutil
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_launched = set()  # (launcher, kernel) pairs seen in this run


def expected_launchers():
    """`module:function` of every function in kernels/ and nanfuse/ that calls `launch.run()`."""
    found = set()
    for folder, package in (("kernels", "nanfuse.kernels"), ("nanfuse", "nanfuse")):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef) and any(
                        isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr == "run" and isinstance(call.func.value, ast.Name)
                        and call.func.value.id == "launch" for call in ast.walk(node)):
                    found.add(f"{package}.{path.stem}:{node.name}")
    return found


def expected_kernels():
    import nanfuse.kernels

    names = set()
    for info in pkgutil.iter_modules(nanfuse.kernels.__path__):
        if info.name == "aot_check":
            continue
        module = importlib.import_module(f"nanfuse.kernels.{info.name}")
        names |= {name for name, value in vars(module).items()
                  if name.endswith("_kernel") and hasattr(value, "fn") and hasattr(value, "__getitem__")}
    return names


def _kernel_name(kernel):
    while not hasattr(kernel, "fn") and hasattr(kernel, "kernel"):  # a test's counting wrapper
        kernel = kernel.kernel
    return kernel.fn.__name__


def pytest_configure(config):
    from nanfuse.kernels import common

    run = common.Launch.run

    def recording_run(self):
        caller = sys._getframe(1)
        _launched.add((f"{caller.f_globals['__name__']}:{caller.f_code.co_name}", _kernel_name(self.kernel)))
        return run(self)

    common.Launch.run = recording_run


def pytest_sessionfinish(session, exitstatus):
    missing_launchers = expected_launchers() - {launcher for launcher, _ in _launched}
    missing_kernels = expected_kernels() - {kernel for _, kernel in _launched}
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write("\n")
    if missing_launchers or missing_kernels:
        reporter.write_line(f"NANFUSE_CHECK_LAUNCHES: never launched: kernels {sorted(missing_kernels)}, "
                            f"from launchers {sorted(missing_launchers)}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        reporter.write_line(f"NANFUSE_CHECK_LAUNCHES: every kernel ({len(expected_kernels())}) and launcher "
                            f"({len(expected_launchers())}) was launched")
