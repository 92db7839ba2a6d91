"""Config files that ship with the package because the package reads them.

dataset/base.yaml  the keys every dataset config has, with their defaults: the dataset configs
                   select it (configs/train.yaml puts this package on Hydra's search path), and
                   `dataset_overrides` gives a checkpoint that predates a key its default from it
"""
