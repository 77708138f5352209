"""Config-driven runs: the code behind ``fedpac-hf train CONFIG.yaml``.

- :mod:`~fedpac_hf.run.config`: the run config, :class:`ModelDataArguments`
  plus :class:`~fedpac_hf.FedPACArguments`;
- :mod:`~fedpac_hf.run.parsing`: reading them (:func:`parse_run_config`);
- :mod:`~fedpac_hf.run.tasks`: model, data and processing per task type
  (:func:`build_task`), with :mod:`~fedpac_hf.run.data` for loading and
  tokenizing;
- :mod:`~fedpac_hf.run.rundir`: the run directory's files;
- :mod:`~fedpac_hf.run.train`: :func:`run_training` and :func:`run_example`.
"""

from .config import TASKS, ModelDataArguments
from .data import train_bpe_tokenizer
from .parsing import changed_training_arguments, config_parser, parse_run_config
from .rundir import RunFilesCallback
from .tasks import TaskBundle, build_task, minilm_path
from .train import run_example, run_training

__all__ = [
    "TASKS",
    "ModelDataArguments",
    "RunFilesCallback",
    "TaskBundle",
    "build_task",
    "changed_training_arguments",
    "config_parser",
    "minilm_path",
    "parse_run_config",
    "run_example",
    "run_training",
    "train_bpe_tokenizer",
]
