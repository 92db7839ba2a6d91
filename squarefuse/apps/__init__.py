"""The apps behind the entry points: each composes its config's values and calls the library.

evaluate        `eval.py`: checkpoint -> multi-view test of a split -> result files
predict         `scripts/predict.py`: top-k classes of your own videos
extract         `scripts/extract.py`: per-video features
cache_tokens    `scripts/cache_tokens.py`: a frozen backbone's per-frame tokens -> a token cache
export          `scripts/export.py`: ONNX or TorchScript
checkpoint_dir  `${checkpoint_dir:CKPT,SUBDIR}`: the apps' output folder next to the checkpoint's run
batch_settings  batch size, workers and precision from the keys the eval, predict and extract configs share
"""
