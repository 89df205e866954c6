"""Entry module for `python -m dpo.export`: merge a run's adapter into its base and/or push it with a model card.

The command keeps its short name; the code lives in dpo.evaluation.export (this file only calls its `main`).
"""

from dpo.evaluation.export import main

if __name__ == "__main__":
    main()
