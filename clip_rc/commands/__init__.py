"""The command-line programs: training, evaluation, prediction, conversion, export, FLOPs and speed reports."""
