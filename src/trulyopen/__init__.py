"""trulyopen: from raw text to a released language model in which every artifact is verifiable.

`import trulyopen as to` gives the public Python API (`trulyopen.api`: to.run, to.evaluate_model,
to.release_run, to.verify, to.generate, to.start_server, ...), loaded on first use so that this
import stays quick.
"""

__version__ = "0.1.0"

# trulyopen.api's names (its __all__), here so that they resolve without importing it first
_API = (
    "LoadedModel",
    "audit",
    "eval_results",
    "evaluate_model",
    "export",
    "generate",
    "load_model",
    "load_recipe",
    "metrics",
    "release_run",
    "replay",
    "report",
    "run",
    "start_server",
    "verify",
)

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from trulyopen import api

        return getattr(api, name)
    raise AttributeError(f"module 'trulyopen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
