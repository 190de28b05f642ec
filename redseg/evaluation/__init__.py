"""Evaluation: probability maps + ground truth -> the authors' precision-recall protocol (AUC_PR, AP,
break-even), metrics.json and the report. May import redseg.data (to read labels and prepared sets)
and the top-level modules; never Caffe, so any method's maps can be scored.
"""
