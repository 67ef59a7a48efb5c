"""The hub dir on disk: snapshots installed atomically (`store`), the manifest that lets a load
notice a changed file (`manifest`), checkpoints already verified (`verified`), and what the
cache holds, with its checks and clean-ups (`inventory`, behind `isolhub cache`).
"""

__all__: list[str] = []
