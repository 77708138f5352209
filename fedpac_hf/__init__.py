"""fedpac_hf: federated second-order fine-tuning for Hugging Face Transformers.

FedPAC (preconditioner alignment and correction) lets SOAP, Sophia and Muon
clients train on non-IID data without the preconditioner drift that makes
naive federated second-order training stall or diverge.
"""

__version__ = "0.1.0"
