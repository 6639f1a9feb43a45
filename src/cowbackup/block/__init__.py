"""The block layer: nodes, the generic request path, the node graph, drivers, filters and the copy engine."""
