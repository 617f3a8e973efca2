"""The reference verifier: challenges, assertion checks, access tokens, device registry.

:class:`Verifier` is framework-free; the ASGI app, broker plugins and CLI are thin layers on it.
"""

from device_sdk.verifier.config import VerifierConfig, channel_bindings_from_pem
from device_sdk.verifier.core import AudienceKind, VerifiedAssertion, Verifier
from device_sdk.verifier.ratelimit import (
    RateLimit,
    RateLimiter,
    RedisTokenBucketLimiter,
    TokenBucketLimiter,
)
from device_sdk.verifier.registry import (
    DeviceRecord,
    DeviceRegistry,
    SQLiteDeviceRegistry,
    hash_enrollment_token,
)
from device_sdk.verifier.signatures import SUPPORTED_ALGORITHMS, verify_signature
from device_sdk.verifier.stores import (
    ChallengeStore,
    MemoryChallengeStore,
    RedisChallengeStore,
    SQLiteChallengeStore,
)

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "AudienceKind",
    "ChallengeStore",
    "DeviceRecord",
    "DeviceRegistry",
    "MemoryChallengeStore",
    "RateLimit",
    "RateLimiter",
    "RedisChallengeStore",
    "RedisTokenBucketLimiter",
    "SQLiteChallengeStore",
    "SQLiteDeviceRegistry",
    "TokenBucketLimiter",
    "VerifiedAssertion",
    "Verifier",
    "VerifierConfig",
    "channel_bindings_from_pem",
    "hash_enrollment_token",
    "verify_signature",
]
