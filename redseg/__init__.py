"""Red-Seg in Caffe: library code shared by the tools, the Python layers and the tests."""
