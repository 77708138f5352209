"""The ClientApp: FedPAC's client rule on this node's partition."""

from fedpac_hf.flower import make_client_app

from .task import APP_SETTINGS, build_trainer

app = make_client_app(build_trainer, app_settings=APP_SETTINGS)
