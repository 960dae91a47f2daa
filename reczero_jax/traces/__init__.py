"""Four-tag reasoning traces for RecOne's warm-start SFT.

* ``template_trace(sample) -> str``: the built-in offline teacher, a scaffold for the format
  (``traces.template``); ``template_rating``, ``template_records``.
* ``generate_traces(model, tokenizer, samples, ...)``: a teacher LLM's traces with one
  rationalisation retry (``traces.teacher``; rules and the hint text in ``traces.rules``).
* ``load_traces(path, samples)`` / ``validate_traces``: JSON-lines trace files checked against
  the samples and the format rule (``traces.io``); ``write_traces``; ``sft_responses(records,
  source)``: the warm start's response per record (template traces or a trace file's).
* ``reczero traces generate | import``: ``traces.cli``.

Names are imported on first use, so that ``reczero --help`` (which imports ``traces.cli``)
does not import jax.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "template_rating": "template", "template_trace": "template", "template_records": "template",
    "generate_traces": "teacher", "with_hint": "teacher",
    "load_traces": "io", "validate_traces": "io", "write_traces": "io", "sft_responses": "io",
    "ValidationReport": "io",
    "RATING_HINT": "rules", "judge": "rules", "trace_outcome": "rules",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
