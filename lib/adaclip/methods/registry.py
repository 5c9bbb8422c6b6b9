"""The registry of methods by name: the built-in ones, those registered with `register`, and those
other installed packages declare under the ``adaclip.methods`` entry point.

A method from another package needs no change here:

    # mypackage/mymethod.py
    from adaclip import methods

    @methods.register
    class MyMethod(methods.Method):
        name = "mymethod"
        config_class = MyConfig
        ...

    # mypackage's pyproject.toml: found by `methods.available()`, `adaclip train --method mymethod`,
    # the notebooks and sweeps, once the package is installed
    [project.entry-points."adaclip.methods"]
    mymethod = "mypackage.mymethod:MyMethod"

Entry points are read the first time a name is looked up (not at import, so that a plug-in may
import adaclip itself). Imports nothing of the methods: `methods/__init__.py` registers the built-in
ones by importing their modules.
"""
from __future__ import annotations

import logging
from importlib import metadata
from typing import Optional

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "adaclip.methods"
REGISTRY: dict[str, type] = {}
_discovered = False


def register(cls: Optional[type] = None, *, name: Optional[str] = None):
    """Register a `Method` subclass under ``name`` (default its ``name`` attribute); usable as
    ``@register`` or ``@register(name="other")``. Registering another class under a taken name is an
    error; the same class again (a reloaded module) replaces it."""
    def add(cls: type) -> type:
        key = name or getattr(cls, "name", "")
        missing = [a for a in ("name", "config_class", "forward") if not getattr(cls, a, None)]
        if not isinstance(cls, type) or missing or not key:
            raise TypeError(f"{cls!r} is not a method: a subclass of adaclip.methods.Method with a `name` and a "
                            f"`config_class` (missing: {missing or ['name']})")
        old = REGISTRY.get(key)
        if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"method name {key!r} is taken by {old.__module__}.{old.__qualname__}; "
                             f"register {cls.__qualname__} under another name")
        REGISTRY[key] = cls
        return cls

    return add(cls) if cls is not None else add


def discover() -> None:
    """Register the methods installed packages declare under the ``adaclip.methods`` entry point
    (once). A plug-in that fails to load is reported and skipped, not fatal to the others."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            if isinstance(loaded, type) and ep.name not in REGISTRY:
                register(loaded, name=ep.name)
        except Exception as e:                   # a broken plug-in must not take the built-in methods down
            log.warning("method plug-in %s = %s could not be loaded: %s: %s", ep.name, ep.value, type(e).__name__, e)


def available() -> list[str]:
    """The registered method names, sorted (built-in, registered and installed plug-ins)."""
    discover()
    return sorted(REGISTRY)


def get(name: str) -> type:
    """The method class registered as ``name``."""
    if name not in REGISTRY:
        discover()
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {available()} (a method from another package "
                         f"registers with @adaclip.methods.register or the '{ENTRY_POINT_GROUP}' entry point)")
    return REGISTRY[name]


def name_of(cfg) -> str:
    """The registered method whose config ``cfg`` is; a dict names it under "method" (default AdaCLIP)."""
    if isinstance(cfg, dict):
        return cfg.get("method", "adaclip")
    discover()
    for name, cls in REGISTRY.items():
        if type(cfg) is cls.config_class:
            return name
    raise ValueError(f"{type(cfg).__name__} is no registered method's config; available: {available()}")
