"""Red-Seg in Caffe: the library behind tools/, python_layers/ and tests/.

Subpackages by pipeline stage, bottom-up as the data flows; each imports only stages above it in
this list (docs/architecture.md says which ones) and the top-level modules: config (the paper's
constants), fileio (atomic writes), cli (the tools' shared argument parser).

    toolchain    where Caffe comes from, which BLAS kernels it runs, how it is imported
    data         data sets on disk -> prepared sets (and the field of view)
    model        the network (Table 1), the Top-k schedule, the float64 reference losses, VGG16
    evaluation   maps + labels -> the authors' PR protocol, metrics.json, the report
    deploy       a trained model on new photographs: Caffe or ONNX inference, screening
    training     the two-stage driver and its gradient study
    experiments  many runs at once: make reproduce, benchmarks
"""
