"""The one decorator the registries share (pipeline sources, rewards, prompt sets)."""
from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def registrar(table: dict) -> Callable[[str], Callable[[F], F]]:
    """`register(name)`: a decorator that files the function it decorates in `table` as `name`."""
    def register(name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            table[name] = fn
            return fn
        return deco
    return register
