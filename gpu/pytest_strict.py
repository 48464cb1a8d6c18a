"""pytest plugin of the GPU proof kit (``-p pytest_strict``, gpu/ on PYTHONPATH): on the GPU machine
a CUDA test must run, not skip. tests/conftest.py skips them without a device, and tests of the
compiled ops skip without the extension; either would turn `pytest -k cuda` green with nothing
proven. So the session fails at once without a device or the extension, and at the end if any
test skipped for those reasons or if no test passed.
"""
import pytest
import torch

_ENVIRONMENT_SKIPS = ("needs a CUDA device", "needs the compiled extension")
_skips = []
_passed = [0]


def pytest_sessionstart(session):
    import provcollate

    if not torch.cuda.is_available():
        raise pytest.UsageError("pytest_strict: torch sees no CUDA device, so every CUDA test would skip")
    if not provcollate.HAS_EXTENSION:
        raise pytest.UsageError("pytest_strict: provcollate's compiled extension did not load")


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason))
    elif report.passed and report.when == "call":
        _passed[0] += 1


def pytest_sessionfinish(session, exitstatus):
    environment = [(node, why) for node, why in _skips if any(s in why for s in _ENVIRONMENT_SKIPS)]
    if environment or not _passed[0]:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    for node, why in _skips:
        terminalreporter.write_line(f"pytest_strict: skipped {node}: {why}")
    environment = [node for node, why in _skips if any(s in why for s in _ENVIRONMENT_SKIPS)]
    if environment:
        terminalreporter.write_line(f"pytest_strict: FAILED: {len(environment)} CUDA test(s) skipped for want of a device "
                                    "or of the extension")
    if not _passed[0]:
        terminalreporter.write_line("pytest_strict: FAILED: no test passed")
