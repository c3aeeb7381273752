"""Neural network models (NetVLAD, QuadTree-attention LoFTR), each in its own module."""
