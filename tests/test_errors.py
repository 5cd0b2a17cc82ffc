"""One error tree (issue 13.2): every exception the package defines derives from `sidecar.errors.Error`
through one of its branches and is placed on the map in that module's docstring, and no class named like
an exception is anything else."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import aiohttp
import pytest

import sidecar
from sidecar import errors
from sidecar.config import ConfigError
from sidecar.control.http import AdminError
from sidecar.devtools.embedded import EmbeddedError
from sidecar.money import MoneyError
from sidecar.protocols.errors import SidecarError
from sidecar.proxy.upstream import RedirectRefused
from sidecar.sse import SSEError

BRANCHES = (errors.ApiError, errors.DomainError, errors.StartupError, errors.ControlFlow)
EXCEPTION_SUFFIXES = ("Error", "Exception")


def package_modules() -> list[ModuleType]:
    """Every module of the package, the development tools included."""
    names = [info.name for info in pkgutil.walk_packages(sidecar.__path__, "sidecar.")]
    return [sidecar, *(importlib.import_module(name) for name in names)]


def exceptions_defined_in(modules: list[ModuleType]) -> set[type[BaseException]]:
    """The exception classes these modules define: those at module level, and every subclass of one
    (or of a library's exception) that a module of theirs declares anywhere."""
    names = {module.__name__ for module in modules}
    found: set[type[BaseException]] = set()
    stack: list[type] = [BaseException]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__ in names:
            found.add(cls)
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ in names:
                found.add(value)
    return found


def off_the_tree(classes: set[type[BaseException]]) -> list[str]:
    """The classes that do not hang under one of the root's branches (the root itself aside)."""
    return sorted(
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in classes
        if cls is not errors.Error and not issubclass(cls, BRANCHES)
    )


def misnamed(modules: list[ModuleType]) -> list[str]:
    """Classes named like an exception that are not one: someone would try to raise them."""
    return sorted(
        f"{module.__name__}.{name}"
        for module in modules
        for name, value in vars(module).items()
        if isinstance(value, type)
        and value.__module__ == module.__name__
        and name.endswith(EXCEPTION_SUFFIXES)
        and not issubclass(value, BaseException)
    )


def test_every_exception_of_the_package_derives_from_the_root():
    modules = package_modules()
    classes = exceptions_defined_in(modules)
    # The walk reaches every corner: both APIs' errors, a devtools error, a library's subclass, a private one.
    assert {SidecarError, AdminError, EmbeddedError, RedirectRefused} <= classes
    assert "_ClientGone" in {cls.__qualname__ for cls in classes}
    assert len(classes) >= 20
    assert off_the_tree(classes) == []


def test_the_map_in_the_docstring_names_every_exception():
    doc = errors.__doc__ or ""
    classes = exceptions_defined_in(package_modules())
    unmapped = sorted(cls.__qualname__ for cls in classes if cls.__qualname__ not in doc)
    assert unmapped == []


def test_no_class_is_named_like_an_exception_unless_it_is_one():
    assert misnamed(package_modules()) == []


def test_the_checks_catch_an_exception_off_the_tree_and_a_misnamed_value():
    module = ModuleType("sidecar.fake_for_test")
    stray = type("StrayError", (ValueError,), {"__module__": module.__name__})
    rooted = type("RootedError", (errors.DomainError, ValueError), {"__module__": module.__name__})
    answer = type("UpstreamError", (), {"__module__": module.__name__})
    module.StrayError, module.RootedError, module.UpstreamError = stray, rooted, answer
    found = exceptions_defined_in([module])
    assert {stray, rooted} <= found
    assert off_the_tree(found) == ["sidecar.fake_for_test.StrayError"]
    assert misnamed([module]) == ["sidecar.fake_for_test.UpstreamError"]


def test_an_exception_that_is_also_a_library_one_is_caught_as_either():
    assert issubclass(RedirectRefused, aiohttp.ClientError) and issubclass(RedirectRefused, errors.DomainError)
    for cls in (ConfigError, MoneyError, SSEError):
        assert issubclass(cls, ValueError)
    with pytest.raises(errors.Error):
        raise RedirectRefused(307)
    with pytest.raises(aiohttp.ClientError):
        raise RedirectRefused(307)
