"""Entry module for `python -m dpo.models`: turn a pip-installed GGUF (SmolLM2-135M-Instruct) into a model folder.

The command keeps its short name; the code lives in dpo.offline.pip_models (this file only calls its `main`).
"""

from dpo.offline.pip_models import main

if __name__ == "__main__":
    main()
