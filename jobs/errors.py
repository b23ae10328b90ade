"""The one error hierarchy of kd-daemon.

Every error a submitter can see is a `KDError`; its message says what failed, the value, and
what to do. `retryable` tells the worker whether rq may run the job again (a malformed file
will be just as malformed next time; an interrupted run is worth resuming).
"""

from __future__ import annotations


class KDError(Exception):
    """Base of every kd-daemon error."""

    retryable = False


class ConfigError(KDError):
    """A KD setting, a worker setting or a job field is unknown or out of range."""


class DataError(KDError):
    """Training data is malformed, empty, too large, or does not match its checksum."""


class CorpusFull(DataError):
    """Recording a job's examples would take its domain's corpus over KD_CORPUS_MAX_EXAMPLES or
    KD_CORPUS_MAX_BYTES; `kd-client data --domain D forget ID...` makes room."""


class ModelError(KDError):
    """A model directory is missing, unreadable or inconsistent."""


class VocabularyMismatch(ModelError):
    """Teacher and student tokenizers cannot be paired the requested way."""


class TrainingDiverged(KDError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ResourceLimitExceeded(KDError):
    """A job went over the worker's memory budget (KD_MAX_JOB_MEMORY); it would again."""


class PublishError(KDError):
    """Writing a new adapter version failed; the previous version stays current."""


class TransferError(PublishError):
    """A version in Redis is missing, oversized, truncated or does not match its digests; nothing of
    it was installed."""


class SecurityError(KDError):
    """A payload tried to reach outside what the worker allows (paths, functions)."""


class StateError(KDError):
    """State in Redis or on disk that kd-daemon did not write (a key of the wrong type, a planted
    entry): refused, never worked around; the message names it and how to clear it."""


class JobCanceled(KDError):
    """The job was canceled on request."""


class JobInterrupted(KDError):
    """The worker is shutting down; the job checkpointed and will resume."""

    retryable = True
