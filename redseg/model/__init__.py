"""Model: the Red-Seg network of Table 1 as NetSpec prototxts, the Top-k lambda staircase (Sec. 3.2),
the float64 reference losses that the Python layers are tested against (Eqs. 1-4), and VGG16's
ImageNet weights. May import redseg.toolchain (to build and load nets) and the top-level modules.
"""
