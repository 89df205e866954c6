"""Entry module for `python -m dpo.evaluate`: did the model get better? held-out metrics, generations, report.

The command keeps its short name; the code lives in dpo.evaluation.evaluate (this file only calls its `main`).
"""

from dpo.evaluation.evaluate import main

if __name__ == "__main__":
    main()
