"""fedclip's Hydra launcher `hydra/launcher=batched`: a sweep's compatible points as one computation."""
