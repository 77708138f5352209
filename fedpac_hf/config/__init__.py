"""Run settings: :class:`~fedpac_hf.config.arguments.FedPACArguments` and what reads them.

- ``arguments.py``: ``FedPACArguments`` (``TrainingArguments`` + the federated fields);
- ``checks.py``: the consistency checks every ``FedPACArguments`` passes;
- ``validation.py``: reading one setting the same way from YAML, the command
  line, Python and Flower's run config;
- ``curvature_forms.py``: the ``curvature`` setting's forms of Theta.

Nothing here imports ``transformers.Trainer``: the Flower ServerApp reads its
settings without the HF training shell.
"""
