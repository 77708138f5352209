"""The Hugging Face shell: ``FedPACTrainer``, a ``transformers.Trainer`` that runs rounds.

- ``fedpac_trainer.py``: ``FedPACTrainer`` (owns the client split, maps a round
  onto one ``global_step``);
- ``client_steps.py``, ``round_checkpoints.py``: its two mixins (one client's
  local steps with Trainer's machinery; round checkpoints and resume);
- ``callbacks.py``: round events and the console;
- ``evaluation.py``: evaluating a global model (also the Flower ServerApp's
  central evaluation);
- ``host_syncs.py``: counting the reads that make the host wait for a device;
- ``logs.py``: where the package's log lines go, at the run's ``log_level``
  (called by ``fedpac-hf train``, the example scripts and the Flower apps).

The package imports nothing by itself, so ``fedpac_hf.trainer.evaluation``
does not load ``FedPACTrainer``; the public entry is ``fedpac_hf.FedPACTrainer``.
"""
