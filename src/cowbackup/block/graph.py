"""The block graph: named nodes and the edges between them.

An edge (:class:`~cowbackup.block.node.Child`, defined with the node that holds it) joins a parent to
a node under a role name (``file``, ``target``, ``root``).  Parents are nodes (a format over its protocol
node, a filter over its source) or :class:`~cowbackup.block.node.Root` users that are not nodes (an NBD
export, a job, the CLI).  Users always reach a node *through its edge*, never by
keeping a reference to the node, so that re-pointing edges changes where their I/O goes.

Inserting a filter above a node re-points **all** of the node's parents to the filter; this is how an
export's writes come to pass through copy-before-write while a backup runs::

    before:   export ──> src            after insert_filter(cbw, src):   export ──> cbw ──file──> src
              job    ──> src                                             job    ──> cbw

:meth:`BlockGraph.drop_filter` undoes it: the filter's parents are pointed at its child again.  The edges
a filter added with ``blockdev-add`` took over are remembered (``FilterNode.adopted``): ``blockdev-del`` of
it is allowed while only they use it, and hands them back to the child first.
"""

from __future__ import annotations

import itertools
import re

from cowbackup.block.errors import BlockError
from cowbackup.block.node import BlockNode, Child, FilterNode, Root
from cowbackup.block.objects import ObjectRegistry

#: The edges are defined with the node, which holds them; they are the graph's vocabulary too.
__all__ = ["BlockGraph", "Child", "Root"]

_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}")


class BlockGraph:
    """All nodes of one daemon, by node name.  Owned by the event loop; no locking."""

    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}
        #: The user-created objects nodes refer to by id (the TLS credentials of ``nbd`` nodes).
        self.objects = ObjectRegistry()
        self._auto_names = itertools.count()

    # ------------------------------------------------------------------ names

    def auto_name(self) -> str:
        """A fresh internal node name; like QEMU's ``#blockNNN`` it cannot clash with user names."""
        while True:
            name = f"#block{next(self._auto_names):03d}"
            if name not in self.nodes:
                return name

    @staticmethod
    def check_node_name(name: str) -> None:
        if not _NODE_NAME.fullmatch(name):
            raise BlockError(f"Invalid node-name: '{name}'")

    def add(self, node: BlockNode) -> BlockNode:
        if node.node_name in self.nodes:
            raise BlockError(f"Duplicate nodes with node-name='{node.node_name}'")
        self.nodes[node.node_name] = node
        return node

    def get(self, name: str) -> BlockNode:
        """The node called ``name``, or BlockError with QEMU's message."""
        node = self.nodes.get(name)
        if node is None:
            raise BlockError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def find(self, name: str) -> BlockNode | None:
        return self.nodes.get(name)

    # ------------------------------------------------------------------ edges

    def attach(self, parent: BlockNode | Root, role: str, node: BlockNode) -> Child:
        """Join ``parent`` to ``node`` as ``role``."""
        child = Child(parent, role, node)
        node.parents.append(child)
        if isinstance(parent, Root):
            if parent.child is not None:
                raise BlockError(f"{parent.description} is already attached")
            parent.child = child
        else:
            if role in parent.children:
                raise BlockError(f"node '{parent.node_name}' already has a '{role}' child")
            parent.children[role] = child
        return child

    def detach(self, child: Child) -> None:
        """Remove an edge.  Safe to call for an edge already removed."""
        if child in child.node.parents:
            child.node.parents.remove(child)
        parent = child.parent
        if isinstance(parent, Root):
            if parent.child is child:
                parent.child = None
        elif parent.children.get(child.role) is child:
            del parent.children[child.role]

    def _repoint(self, child: Child, node: BlockNode) -> None:
        child.node.parents.remove(child)
        child.node = node
        node.parents.append(child)

    def insert_filter(self, filt: FilterNode, below: BlockNode, *, adopt: bool = False) -> None:
        """Attach ``filt`` above ``below`` and re-point all of ``below``'s other parents to it.

        The filter must not yet have a ``file`` child.  ``adopt``: remember the re-pointed edges, so that
        ``blockdev-del`` of the filter hands them back (a filter the user added, not a job's).
        """
        if "file" in filt.children:
            raise BlockError(f"filter '{filt.node_name}' already has a child")
        others = list(below.parents)
        own = self.attach(filt, "file", below)
        filt.refresh_limits()
        for edge in others:
            if edge is not own:
                self._repoint(edge, filt)
                if adopt:
                    filt.adopted.append(edge)

    def drop_filter(self, filt: FilterNode) -> None:
        """Point every parent of ``filt`` at its child, detach it and remove it from the graph."""
        own = filt.children.get("file")
        if own is not None:
            below = own.node
            for edge in list(filt.parents):
                self._repoint(edge, below)
            self.detach(own)
        filt.adopted.clear()
        if self.nodes.get(filt.node_name) is filt:
            del self.nodes[filt.node_name]

    # ------------------------------------------------------------------ removal

    def users_of(self, node: BlockNode, *, skip_adopted: bool = False) -> list[str]:
        """Who holds ``node``: descriptions of its parents, for "busy" errors (``skip_adopted``: not the
        parents a filter took over when it was inserted)."""
        out = []
        for edge in node.parents:
            if skip_adopted and isinstance(node, FilterNode) and edge in node.adopted:
                continue
            if isinstance(edge.parent, Root):
                out.append(edge.parent.description)
            else:
                out.append(f"node '{edge.parent.node_name}' ({edge.role})")
        return out

    async def remove(self, name: str) -> None:
        """Close and remove a node nobody uses (``blockdev-del``); its children lose this parent.

        Children that were created implicitly with it (inline options) are removed too when unused.
        """
        node = self.get(name)
        users = self.users_of(node, skip_adopted=True)
        if users:
            raise BlockError(f"Node '{name}' is busy: node is used by {', '.join(users)}")
        if isinstance(node, FilterNode):
            self.give_back(node)
        await self._remove_node(node)

    def give_back(self, filt: FilterNode) -> None:
        """Point the parents ``filt`` took over when it was inserted back at its child."""
        own = filt.children.get("file")
        for edge in filt.adopted:
            if own is not None and edge.node is filt:
                self._repoint(edge, own.node)
        filt.adopted.clear()

    async def abandon(self, node: BlockNode) -> None:
        """Close a node whose opening failed after its children were attached; drop implicit children."""
        if isinstance(node, FilterNode):
            self.give_back(node)
        await self._remove_node(node)

    async def _remove_node(self, node: BlockNode) -> None:
        if self.nodes.get(node.node_name) is node:
            del self.nodes[node.node_name]
        await node.close()
        for edge in list(node.children.values()):
            self.detach(edge)
            below = edge.node
            if not below.parents and below.implicit and below.node_name in self.nodes:
                await self._remove_node(below)

    async def close_all(self) -> None:
        """Flush and close every node, parents before children (used at shutdown).

        Errors of one node do not stop the others; the first is raised at the end.
        """
        remaining = dict(self.nodes)
        first_error: BaseException | None = None
        while remaining:
            tops = [
                n
                for n in remaining.values()
                if not any(
                    isinstance(e.parent, BlockNode) and e.parent.node_name in remaining for e in n.parents
                )
            ] or list(remaining.values())
            for node in tops:
                del remaining[node.node_name]
                try:
                    if not node.read_only and not node.closed:
                        await node.flush()
                except OSError as err:
                    first_error = first_error or err
                finally:
                    await node.close()
        if first_error is not None:
            raise first_error
