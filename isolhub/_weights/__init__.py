"""Checkpoints: `load_state_dict_from_url` and its cache (`checkpoints`), the download itself
(`download`), and the broker that downloads for sandboxed workers (`broker`).
"""

__all__: list[str] = []
