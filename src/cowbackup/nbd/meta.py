"""Metadata contexts an export offers (spec: "Metadata querying"), by namespace.

A :class:`MetaContextRegistry` maps each namespace (``base``, ``qemu``, ...) to an *expander*: a callable
that turns one client query of that namespace into the full context names it matches.  The protocol core
asks the registry during ``NBD_OPT_LIST_META_CONTEXT`` (``listing=True``) and ``NBD_OPT_SET_META_CONTEXT``
(``listing=False``); what a context *means* (how to answer ``NBD_CMD_BLOCK_STATUS`` for it) is the shell's
business, keyed by the context name.

Rules the registry applies for every namespace (the spec's):

* a query must be ``namespace:leaf`` with a valid namespace, or the option fails with NBD_REP_ERR_INVALID;
* queries of an unknown namespace are ignored;
* ``NBD_OPT_LIST_META_CONTEXT`` with no queries lists every namespace's ``namespace:`` wildcard;
* duplicates are dropped, the first occurrence keeps its place.

:func:`exact_names` builds the usual expander: listing matches a name equal to the query or, for a query
ending in ``:``, every name starting with it (``qemu:`` and ``qemu:dirty-bitmap:`` list all bitmaps);
selecting matches exact names only (an empty leaf selects nothing, as the spec asks).  Names come from a
callable, so contexts that appear later (a new dirty bitmap) are seen by the next negotiation::

    registry = MetaContextRegistry.base()                      # base:allocation
    registry.register("qemu", exact_names(lambda: ["qemu:allocation-depth",
                                                   *("qemu:dirty-bitmap:" + b for b in bitmaps)]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from cowbackup.nbd.constants import BASE_ALLOCATION, NBD_MAX_STRING_SIZE

__all__ = ["MetaContextExpander", "MetaContextRegistry", "exact_names"]

#: ``expand(query, listing)`` -> the full context names ``query`` matches (all in the expander's namespace).
MetaContextExpander = Callable[[str, bool], Iterable[str]]


def exact_names(names: Callable[[], Iterable[str]]) -> MetaContextExpander:
    """An expander over the context names ``names()`` returns (see the module docstring)."""

    def expand(query: str, listing: bool) -> list[str]:
        if listing and query.endswith(":"):
            return [name for name in names() if name.startswith(query)]
        return [name for name in names() if name == query]

    return expand


def _valid_string(name: str) -> bool:
    raw = name.encode()
    return len(raw) <= NBD_MAX_STRING_SIZE and b"\0" not in raw


def _valid_namespace(namespace: str) -> bool:
    return bool(namespace) and all(ch.isprintable() and not ch.isspace() and ch != ":" for ch in namespace)


class MetaContextRegistry:
    """The metadata context namespaces of one export (see the module docstring).

    Mutated only by the export's owner on the event loop; the protocol core only reads it.
    """

    def __init__(self) -> None:
        self._namespaces: dict[str, MetaContextExpander] = {}

    @classmethod
    def base(cls) -> MetaContextRegistry:
        """A registry offering ``base:allocation``."""
        registry = cls()
        registry.register("base", exact_names(lambda: [BASE_ALLOCATION]))
        return registry

    def register(self, namespace: str, expander: MetaContextExpander) -> None:
        """Serve ``namespace`` with ``expander``; ``ValueError`` if the name is invalid or taken."""
        if not _valid_namespace(namespace):
            raise ValueError(f"invalid metadata context namespace {namespace!r}")
        if namespace in self._namespaces:
            raise ValueError(f"metadata context namespace {namespace!r} already registered")
        self._namespaces[namespace] = expander

    def unregister(self, namespace: str) -> None:
        """Stop serving ``namespace`` (``KeyError`` if it is not registered)."""
        del self._namespaces[namespace]

    def __repr__(self) -> str:
        return f"MetaContextRegistry({self.namespaces})"

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def list_contexts(self, queries: Sequence[str]) -> list[str]:
        """Context names for ``NBD_OPT_LIST_META_CONTEXT``; ``ValueError`` for a query with no namespace."""
        if not queries:
            queries = [f"{namespace}:" for namespace in self._namespaces]
        return self._resolve(queries, listing=True)

    def select_contexts(self, queries: Sequence[str]) -> list[str]:
        """Context names for ``NBD_OPT_SET_META_CONTEXT``; ``ValueError`` for a query with no namespace."""
        return self._resolve(queries, listing=False)

    def _resolve(self, queries: Sequence[str], *, listing: bool) -> list[str]:
        found: dict[str, None] = {}
        for query in queries:
            namespace, colon, _ = query.partition(":")
            if not colon or not _valid_namespace(namespace):
                raise ValueError(f"metadata context query {query!r} does not start with a namespace")
            expander = self._namespaces.get(namespace)
            if expander is None:
                continue
            for name in expander(query, listing):
                if name.startswith(f"{namespace}:") and _valid_string(name):
                    found.setdefault(name, None)
        return list(found)
