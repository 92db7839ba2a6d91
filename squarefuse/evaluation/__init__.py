"""Evaluation: a model and an eval split -> view-averaged predictions -> metrics -> result files.

evaluator      `evaluate`: every video once, its views softmax-averaged, exact under DDP
inference_loop the batch loop over eval items that eval, predict and extract share
metrics        the `METRICS` registry (top-1, top-k, mean-class accuracy, loss), `EvalResult`, confusion matrix
class_subsets  top-1 on named class subsets, twin confusion of time-opposite pairs (files of class names)
results        result files (results.json, per_class.csv, predictions.csv, probs.pt, plot), summary lines
frame_order    eval with the frames of every clip reversed or shuffled
ensemble       the weighted mean of the saved probabilities of several evaluations
eval_files     the files of an eval folder and when it is complete (torch-free: the report reads it)
"""
