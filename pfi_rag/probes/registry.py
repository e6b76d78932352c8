"""Every probe the runner knows, in report order, derived from the probe classes.

A probe is one module under ``pfi_rag/probes/``: every concrete :class:`ClientProbe` or
:class:`FederationProbe` subclass with a ``name`` defined in one of the package's modules is
found on first use. A probe class defined elsewhere (a plugin, a test) joins with
:func:`register`. Reports list probes by their ``order`` (then name); a probe that sets none
comes after the shipped ones.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from pfi_rag.config import Config, ConfigError, ProbesConfig, probe_thresholds_table
from pfi_rag.probes.base import ClientProbe, FederationProbe, Probe

SUITES = ("all", "privacy", "fairness", "rag", "federation")

_registered: dict[str, Probe] = {}  # name -> probe
_discovered = False


def register(probe_class: type[Probe]) -> type[Probe]:
    """Adds ``probe_class`` to the suite (usable as a class decorator); returns it unchanged.

    Its threshold is the ``probes.<name>_threshold`` config key when the config has one, else
    the thresholds file's ``<name>_threshold`` (``probes.thresholds_file``), else the class's
    ``default_threshold``.
    """
    if not (isinstance(probe_class, type) and issubclass(probe_class, ClientProbe | FederationProbe)):
        raise TypeError(f"{probe_class!r} is not a ClientProbe or FederationProbe subclass")
    if inspect.isabstract(probe_class) or not isinstance(getattr(probe_class, "name", None), str):
        raise TypeError(f"{probe_class.__name__} must set a name and implement its run method")
    _discover()  # the package's probes first, so a taken name is refused whatever the order
    name = probe_class.name
    configured = f"{name}_threshold" in ProbesConfig.model_fields
    own_threshold = probe_class.threshold is not Probe.threshold  # e.g. audit's fixed 0
    if not (configured or own_threshold or probe_class.default_threshold is not None):
        raise TypeError(f"{probe_class.__name__} must set default_threshold (no probes.{name}_threshold key)")
    known = _registered.get(name)
    if known is not None and type(known) is not probe_class:
        theirs, ours = type(known).__qualname__, probe_class.__qualname__
        raise ValueError(f"two probes named {name!r}: {theirs} and {ours}")
    _registered[name] = probe_class()
    return probe_class


def unregister(name: str) -> None:
    """Removes the probe named ``name`` (a probe registered for a while, e.g. by a test)."""
    _discover()
    _registered.pop(name, None)


def _discover() -> None:
    """Registers every probe class defined in a module of this package (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("pfi_rag.probes")
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and obj.__module__ == module.__name__
                and issubclass(obj, ClientProbe | FederationProbe)
                and not inspect.isabstract(obj)
                and isinstance(getattr(obj, "name", None), str)
            ):
                register(obj)


def all_probes() -> list[Probe]:
    """Every registered probe, in report order."""
    _discover()
    return sorted(_registered.values(), key=lambda p: (p.order, p.name))


def probes_for(suite: str) -> list[Probe]:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}")
    return [p for p in all_probes() if suite == "all" or suite in p.suites]


def probe_named(name: str) -> Probe:
    _discover()
    if name in _registered:
        return _registered[name]
    raise KeyError(f"no probe named {name!r}")


def __getattr__(name: str) -> Any:
    if name == "PROBES":  # every probe in report order, found on first use
        return tuple(all_probes())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def file_thresholds(cfg: Config) -> dict[str, float]:
    """Thresholds ``probes.thresholds_file`` sets for probes with no config key: name -> value.

    A key must name a registered probe that takes a threshold, and its value must be a number.
    """
    out: dict[str, float] = {}
    for key, value in probe_thresholds_table(cfg).items():
        if key in ProbesConfig.model_fields:
            continue  # applied to the config (config.with_probe_thresholds)
        name = key.removesuffix("_threshold")
        try:
            probe = probe_named(name)
        except KeyError:
            probe = None
        where = cfg.probes.thresholds_file
        if probe is None or probe.default_threshold is None:
            raise ConfigError(f"{where}: {key}: no probe named {name!r} takes a threshold")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {key}: must be a number, not {value!r}")
        out[name] = float(value)
    return out
