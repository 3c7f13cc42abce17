"""The SDK's version, sent in User-Agent, create_session and telemetry."""

__version__ = "0.1.0"
