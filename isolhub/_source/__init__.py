"""Where a repo's code comes from: a spec resolved to a commit and its snapshot (`snapshot`),
fetched with git (`git`) or through GitHub's API (`github`), extracted member by member
(`archive`), and admitted to run or refused (`trust`).
"""

__all__: list[str] = []
