"""`make bench-litellm` (python -m bench.litellm): the LiteLLM proxy measured the way `make
bench` measures genmesh, on the same machine, in the same run, against the same simulator.

LiteLLM runs from its own virtual environment (.venv-litellm, pinned by requirements.txt and
constraints.txt here), never imported: this package only writes its config, starts its CLI
and drives it over HTTP, so the project's own venv and mypy never see LiteLLM.
"""
