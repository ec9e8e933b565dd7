"""The paper's baselines that train the backbone on the images (federate/backbone/): `fedavg_full`,
`fedprox_full` (`method.mu`) and `fedclip_full` (CLIP and AttAI together). Their runner is the image
backend (federate/backbone/runner.py), which runs FedAvg's local update itself."""
from __future__ import annotations

from ..errors import ConfigError
from . import Method, register
from .fedavg import Proximal


class ImagesMethod(Method):
    adapter = False  # puts the run's adapter on top of the backbone (fedclip_full)

    def check(self, cfg) -> None:
        if cfg.get("privacy") is not None and cfg.privacy.get("name", "none") != "none":
            raise ConfigError(f"privacy={cfg.privacy.name} runs on the cached embeddings; method={self.name} trains the "
                              "backbone on the images, which has no differential privacy here (use privacy=none)")
        if cfg.backend == "flower":
            raise ConfigError(f"backend=flower runs the methods on the cached embeddings, not {self.name}")
        name = (cfg.get("partition") or {}).get("name", "domain")
        if name != "domain":
            raise ConfigError(f"method={self.name} runs one client per domain, not partition={name}; use "
                              "partition=domain, or a method on the cached embeddings")
        if cfg.dataset.get("classes") is not None:
            raise ConfigError(f"method={self.name} trains on every class of the dataset, so dataset.classes "
                              "cannot name a subset; use a method on the cached embeddings")

    def run(self, cfg, output_dir, start):
        from ..backbone import run_images

        return run_images(cfg, self, output_dir, start)

    def groupable(self, cfg) -> bool:
        return False


@register("fedavg_full")
class FedAvgFull(ImagesMethod):
    pass


@register("fedprox_full", mu=0.01)
class FedProxFull(Proximal, ImagesMethod):
    pass


@register("fedclip_full")
class FedCLIPFull(ImagesMethod):
    adapter = True
