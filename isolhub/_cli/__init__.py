"""The `isolhub` command: `main` parses the command line and hands each sub-command to its
module (`cache`, `diff`, `run`, `env`); `common` holds the flags they share.
"""

__all__: list[str] = []
