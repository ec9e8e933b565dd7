"""Stage 2: FedCLIP rounds on cached CLIP embeddings.

    python -m federate                                   # PACS, target art_painting, 200 rounds
    python -m federate dataset=demo model=tiny_random rounds=20
    python -m federate -m lr=1e-5,5e-5,1e-4 target_domain=art_painting,cartoon,photo,sketch seed=0,1,2
"""

from . import config as _config  # noqa: F401,E402  (registers the config schema with Hydra)
