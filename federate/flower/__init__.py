"""FedCLIP as Flower apps (Message API), in Flower's own layout: `client_app.py` (a SuperNode: one
participating domain), `server_app.py` (aggregation, model selection, outputs), and `task.py`, the code
both share (the run's typed settings, the clients' data, update checks). `simulation.py` runs the same
apps in Flower's simulation engine for `python -m federate backend=flower`.
"""
