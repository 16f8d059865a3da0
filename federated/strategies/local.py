"""Local training (single-site baseline): every client trains alone on its own data and nothing is
ever exchanged; each client's model is evaluated on its own site (and on an unseen test site)."""
from federated.strategies.base import Strategy


class Local(Strategy):
    name = "local"
    summary = "Local: each client trains alone, no weights are exchanged (single-site baseline)"
    schedule_per_epoch = True
    personalized = True
    client_dp_refusal = "local training exchanges nothing, so there is no client update to clip and noise"
    secagg_refusal = "local training exchanges nothing, so there is no sum to protect"

    def is_shared(self, key: str) -> bool:
        return False
