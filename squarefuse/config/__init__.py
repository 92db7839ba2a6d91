"""Config plumbing around Hydra: what the entry points register and check before any work starts.

resolvers          `${launch_stamp:}` and `${if_rank_zero:A,B}`: the same run folder on every rank
override_types     command-line values of the wrong type fail at start-up, naming the key
command_line       an override whose value Hydra's grammar cannot read: how to quote it
dataset_overrides  a checkpoint's stored dataset config with an app's overrides applied
stored_config      a config read from a file as OmegaConf, refused if it holds an interpolation
output_dirs        `<run>/<app>/<stamp>` next to a checkpoint's run, where the apps write
defaults/          config files the package reads and ships (dataset/base.yaml)
"""
