"""Share a cache through the Hugging Face Hub (docs/sharing.md):

    python -m extract.hub export <cache.h5> <folder>          # the hub layout: Parquet + a dataset card
    python -m extract.hub push <cache.h5> <owner/name>        # export and upload in one commit
    python -m extract.hub pull <owner/name>[@<revision>]      # download, verify, rebuild the HDF5 cache
    python -m extract.hub import <folder> <cache.h5>          # the same from a folder obtained another way
    python -m federate cache_file=hf://<owner/name>@<revision> model.name=...

The Parquet files are written by `datasets` and load with `datasets.load_dataset(<folder or repo>, "images")`
(and `"prompts"`); the card's `fedclip` block carries what the HDF5 file holds beyond them, so import
rebuilds the same cache, bit for bit, with the same identity.
"""
