"""Local lm-eval tasks (YAML here, data in ``data/``, built by ``build.py`` from the standard library): found by
``python -m llama.eval lm-eval`` on its own, and by lm-eval's command line with ``--include_path`` this folder."""
