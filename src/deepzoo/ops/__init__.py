"""Tensor primitives shared by families that are more than a stack of layers: detection boxes, anchors, RoI Align."""
