"""Entry module for `python -m dpo.cache`: list and clear the reference log-prob cache.

The command keeps its short name; the code lives in dpo.train.speed.refcache_admin (this file only calls its `main`).
"""

from dpo.train.speed.refcache_admin import main

if __name__ == "__main__":
    main()
