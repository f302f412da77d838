"""tokenprune's evaluation harness (issue #6); installed as ``tokenprune.evals`` (``evals`` in a checkout).

``tokenprune-eval --model bundled:llava --task shapes --methods none,random,fastv --budgets 0.2 --out results/``
(also ``python -m tokenprune.evals ...``, ``python -m evals ...`` in a checkout, and ``accelerate launch -m
tokenprune.evals ...``). Modules, one job each:

* :mod:`evals.metrics` -- lmms-eval's scoring rules (VQA soft accuracy, exact match, POPE, RefCOCO REC).
* :mod:`evals.data`, :mod:`evals.tasks` -- local benchmark files and the bundled ``shapes`` task.
* :mod:`evals.models` -- loading a checkpoint / bundled fixture, prompts, inputs.
* :mod:`evals.runner` -- one (method, budget) over docs: generate, score, FLOPs, kept tokens.
* :mod:`evals.latency` -- vision / prefill / decode / end-to-end timing, KV bytes, peak memory.
* :mod:`evals.harness` -- the resumable, data-parallel run over all cells.
* :mod:`evals.results`, :mod:`evals.report` -- results.json schema, markdown, plots, overlays.
* :mod:`evals.demo` -- ``tokenprune demo``; :mod:`evals.bench_speed` -- the prefill / decode / scoring speed benchmark.
"""
