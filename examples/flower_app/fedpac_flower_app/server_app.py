"""The ServerApp: FedPAC's round engine, centralised evaluation, checkpoints."""

from fedpac_hf.flower import make_server_app

from .task import APP_SETTINGS, build_evaluator, build_model

app = make_server_app(build_model, build_evaluator, app_settings=APP_SETTINGS)
