"""The project's small error hierarchy.

Core code raises these; the boundaries translate them: the Celery task retries a
`TransientError` and quarantines the input on a `PermanentError`, the CLI prints them.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """The configuration is invalid; the message names the key."""


class PermanentError(PipelineError):
    """Retrying cannot help: the input goes to ``data/failed/<id>/`` with this message."""


class InputError(PermanentError):
    """The input cannot be read or has the wrong shape or kind."""


class NotSupportedError(PermanentError):
    """The input is valid but this version cannot process it yet; it is kept."""


class NoModelError(PermanentError):
    """No served model accepts this input."""


class ModelNotFoundError(PermanentError):
    """The Triton server does not serve (or cannot load) the named model."""


class ModelOutputError(PermanentError):
    """The model server answered with an output that does not match its own description."""


class TransientError(PipelineError):
    """A service is unavailable for now (Triton, Redis); the task is retried with backoff."""


class OutputError(PermanentError):
    """A result could not be made into a valid output (a DICOM object failing validation);
    nothing of it is written to results, the item goes to ``data/failed/``."""


class DeliveryError(PermanentError):
    """A destination refused the results for good (rejected association, failure status)."""


class BrokerUnavailableError(TransientError):
    """The broker (Redis) did not take a task: the job waits in the spool and is offered
    again."""
