"""Training: the driver that chains the two solvers (Top-k stage, then FN+FP stage), with resume,
snapshots and loss logs, and the gradient study of the stage-2 learning rate. May import every
stage above it (toolchain, data, model, evaluation, deploy) and the top-level modules.
"""
