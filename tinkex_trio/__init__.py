"""tinkex_trio: a trio-native SDK for the Tinker fine-tuning API.

Synopsis::

    import trio
    from tinkex_trio import open_service, types

    async def main():
        async with open_service() as service:      # TINKER_API_KEY, TINKER_BASE_URL
            training = await service.create_lora_training_client(
                "HuggingFaceTB/SmolLM2-135M-Instruct", rank=8
            )
            ...

    trio.run(main)
"""

from tinkex_trio import types as types
from tinkex_trio._dispatch import RateLimiter as RateLimiter
from tinkex_trio._version import __version__ as __version__
from tinkex_trio.admin import AdminClient as AdminClient
from tinkex_trio.config import Config as Config
from tinkex_trio.download import download as download
from tinkex_trio.errors import (
    APIConnectionError as APIConnectionError,
    APIError as APIError,
    APIStatusError as APIStatusError,
    APITimeoutError as APITimeoutError,
    AuthenticationError as AuthenticationError,
    BadRequestError as BadRequestError,
    BillingError as BillingError,
    ClientClosedError as ClientClosedError,
    ConflictError as ConflictError,
    GoneError as GoneError,
    InternalServerError as InternalServerError,
    InvalidInputError as InvalidInputError,
    MissingAPIKeyError as MissingAPIKeyError,
    NotFoundError as NotFoundError,
    PermissionDeniedError as PermissionDeniedError,
    RateLimitError as RateLimitError,
    RequestFailedError as RequestFailedError,
    ResultTimeoutError as ResultTimeoutError,
    TinkexError as TinkexError,
    UnprocessableEntityError as UnprocessableEntityError,
)
from tinkex_trio.futures import APIFuture as APIFuture
from tinkex_trio.rest import RestClient as RestClient
from tinkex_trio.sampling import SamplingClient as SamplingClient
from tinkex_trio.service import ServiceClient as ServiceClient, open_service as open_service
from tinkex_trio.telemetry import Telemetry as Telemetry
from tinkex_trio.tokenizer import Tokenizer as Tokenizer, get_tokenizer as get_tokenizer
from tinkex_trio.training import TrainingClient as TrainingClient
from tinkex_trio.types import (
    AdamParams as AdamParams,
    Datum as Datum,
    ModelInput as ModelInput,
    PromptProvenanceSpan as PromptProvenanceSpan,
    SampledProvenanceSpan as SampledProvenanceSpan,
    SamplingParams as SamplingParams,
    TensorData as TensorData,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIFuture",
    "APIStatusError",
    "APITimeoutError",
    "AdamParams",
    "AdminClient",
    "AuthenticationError",
    "BadRequestError",
    "BillingError",
    "ClientClosedError",
    "Config",
    "ConflictError",
    "Datum",
    "GoneError",
    "InternalServerError",
    "InvalidInputError",
    "MissingAPIKeyError",
    "ModelInput",
    "NotFoundError",
    "PermissionDeniedError",
    "PromptProvenanceSpan",
    "RateLimitError",
    "RateLimiter",
    "RequestFailedError",
    "RestClient",
    "ResultTimeoutError",
    "SampledProvenanceSpan",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "Telemetry",
    "TensorData",
    "TinkexError",
    "Tokenizer",
    "TrainingClient",
    "UnprocessableEntityError",
    "__version__",
    "download",
    "get_tokenizer",
    "open_service",
    "types",
]
