"""The project's federated runner on Flower (flwr 1.42, Message API): a ServerApp that drives the
same round loop and strategies as the in-process runner (`server_app.py`), a ClientApp that runs
the same local update on each site's SuperNode (`client_app.py`), and a launcher that deploys both
on one machine (`local.py`, `python -m federated.flower local ...`)."""
