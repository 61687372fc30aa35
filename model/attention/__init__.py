"""Attention: the layer (projections, rotary positions, the decode cache) in `layer.py`, and one attention
function (`kernels.attend`) with implementations behind it: dense (the reference), blockwise (flash-style in
plain JAX), splash (TPU Pallas) and cudnn (GPU fused attention)."""
