"""DELG features at scale: core (beam_job.delg), Beam job (beam_job.pipeline), retrieval (beam_job.retrieval)."""

__version__ = "0.1.0"
