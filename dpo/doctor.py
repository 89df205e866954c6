"""Entry module for `python -m dpo.doctor`: the data doctor: check every preference pair before any model loads.

The command keeps its short name; the code lives in dpo.data.doctor (this file only calls its `main`).
"""

from dpo.data.doctor import main

if __name__ == "__main__":
    main()
