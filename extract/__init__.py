"""Stage 1: run CLIP once over a dataset and write the embedding cache.

    python -m extract dataset=pacs
    python -m extract dataset=folder dataset.root=/data/my_dataset model.name=/models/clip-vit-base-patch32
    python -m extract.info cache/pacs/openai--clip-vit-base-patch32.h5
    python -m extract.hub push cache/pacs/openai--clip-vit-base-patch32.h5 lab/pacs-vitb32   # docs/sharing.md
"""
