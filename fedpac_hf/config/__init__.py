"""Run settings: :class:`~fedpac_hf.config.arguments.FedPACArguments` and what reads them.

- ``arguments.py``: ``FedPACArguments`` (``TrainingArguments`` + the federated fields);
- ``checks.py``: the consistency checks every ``FedPACArguments`` passes;
- ``validation.py``: reading one setting the same way from YAML, the command
  line, Python and Flower's run config.

The form of Theta (``curvature``, ``theta_budget``) is decided by
:func:`fedpac_hf.federated.theta_budget.theta_options`, which ``simulate``
calls too. Nothing here imports ``transformers.Trainer``: the Flower ServerApp reads its
settings without the HF training shell.
"""
