"""Worker processes: the parent's side of a worker (`worker`), the zygote workers fork from
(`zygote`), the runtime inside a worker (`runtime`), the messages between them (`messages`),
the random state handed over (`rng`), warnings relayed (`worker_warnings`) and the
installed modules the zygote learns to preload (`preload`).
"""

__all__: list[str] = []
