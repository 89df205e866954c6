"""Entry module for `python -m dpo.tiny`: write the tiny offline Phi model folder used by the tests and demos.

The command keeps its short name; the code lives in dpo.offline.tiny (this file only calls its `main`).
"""

from dpo.offline.tiny import main

if __name__ == "__main__":
    main()
