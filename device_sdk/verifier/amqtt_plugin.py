"""An amqtt (0.12) authentication plugin that checks MQTT logins with a :class:`Verifier`.

The CONNECT username is the device id and the password a fresh assertion whose ``aud`` is one of
the verifier's broker audiences, exactly as for the broker webhooks. amqtt speaks MQTT 3.1.1
only. The plugin is loaded from the broker config's ``plugins`` section, with the verifier
object itself in the plugin config::

    config = broker_config(verifier, host="127.0.0.1", port=1883)
    broker = amqtt.broker.Broker(config)
    await broker.start()

Every decision goes to the verifier's audit log with the client address.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from device_sdk.errors import ConfigError, VerificationError
from device_sdk.verifier.audit import log_decision
from device_sdk.verifier.core import Verifier

logger = logging.getLogger(__name__)

PLUGIN_PATH = "device_sdk.verifier.amqtt_plugin.VerifierAuthPlugin"
TOPIC_PLUGIN_PATH = "device_sdk.verifier.amqtt_plugin.VerifierTopicPlugin"


class VerifierAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Accept a CONNECT only if its password is a valid assertion by the device it names."""

    @dataclass
    class Config:
        """Plugin settings: ``verifier`` is the :class:`Verifier` that checks the assertions.

        ``audience``, when set, is this broker's URL, and every password must carry it as
        ``aud``. Without it, any broker audience of the verifier is accepted.
        """

        verifier: Any = None
        audience: str | None = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        verifier = getattr(self.config, "verifier", None)
        if not isinstance(verifier, Verifier):
            raise TypeError(
                f"{PLUGIN_PATH} needs a Verifier object as its 'verifier' setting, got "
                f"{type(verifier).__name__}; build the broker config with broker_config()"
            )
        self.verifier: Verifier = verifier
        self.audience: str | None = getattr(self.config, "audience", None)
        if self.audience is not None and self.audience not in verifier.config.broker_audiences:
            raise ConfigError(
                f"{PLUGIN_PATH}: audience {self.audience!r} is not a broker audience of the "
                f"verifier ({sorted(verifier.config.broker_audiences)}); pass one of them"
            )

    def _connect_rejection(self, username: str, session: Any) -> tuple[str, str] | None:
        """Return the reason and detail to reject a CONNECT with, before its password is checked."""
        config = self.verifier.config
        if not config.client_id_allowed(username, getattr(session, "client_id", None)):
            return "wrong_client_id", "the MQTT client id does not start with the device id"
        # amqtt 0.12 publishes a will without asking the topic plugins, so it is checked here.
        will_topic = _will_topic(session)
        if will_topic is not None and not config.topic_allowed(username, will_topic):
            return "wrong_topic", "the will topic is outside the device's topics"
        return None

    async def authenticate(self, *, session: Any) -> bool:
        """Return True for a valid, unspent assertion from the device named as username."""
        address = getattr(session, "remote_address", None)
        username = getattr(session, "username", None)
        password = getattr(session, "password", None)
        if isinstance(password, bytes | bytearray):
            password = bytes(password).decode("utf-8", errors="replace")
        if not isinstance(username, str) or not username or not isinstance(password, str):
            log_decision(
                "assertion",
                "reject",
                reason="malformed",
                client_address=address,
                detail="CONNECT without username or password",
                kind="mqtt",
            )
            return False

        rejection = self._connect_rejection(username, session)
        if rejection is not None:
            reason, detail = rejection
            log_decision(
                "assertion",
                "reject",
                reason=reason,
                device_id=username,
                client_address=address,
                detail=detail,
                kind="mqtt",
            )
            return False

        try:
            # The verifier's stores block (SQLite, Redis), so keep them off the event loop.
            await asyncio.to_thread(
                self.verifier.verify_assertion,
                password,
                audience_kind="mqtt",
                client_address=address,
                expected_device_id=username,
                expected_audience=self.audience,
            )
        except VerificationError:
            # verify_assertion has already written the audit line with the reason.
            return False
        return True


class VerifierTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Allow a device only the topics of the verifier's ``device_topic_prefix``, if it has one.

    NOTE: amqtt 0.12.1 bypasses topic plugins in two places, so the policy is not complete
    there: on CONNECT it sends a client the retained messages of every subscription in the
    broker, and a refused CONNECT still deletes the persistent session of its client id. Use
    the amqtt broker for the demo and tests, and RabbitMQ or EMQX where devices must be
    isolated from each other.
    """

    @dataclass
    class Config:
        """Plugin settings: ``verifier`` is the :class:`Verifier` whose topic policy applies."""

        verifier: Any = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        verifier = getattr(self.config, "verifier", None)
        if not isinstance(verifier, Verifier):
            raise TypeError(
                f"{TOPIC_PLUGIN_PATH} needs a Verifier object as its 'verifier' setting, got "
                f"{type(verifier).__name__}; build the broker config with broker_config()"
            )
        self.verifier: Verifier = verifier

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool:
        """Return True if the session's device may publish, subscribe to or receive ``topic``."""
        username = getattr(session, "username", None)
        if not isinstance(username, str) or not isinstance(topic, str):
            return False
        allowed = self.verifier.config.topic_allowed(username, topic)
        if not allowed:
            log_decision(
                "broker_topic",
                "reject",
                reason="wrong_topic",
                device_id=username,
                client_address=getattr(session, "remote_address", None),
                topic=topic,
                action=getattr(action, "value", action),
            )
        return allowed


def _will_topic(session: Any) -> str | None:
    topic = getattr(session, "will_topic", None)
    return topic if getattr(session, "will_flag", False) and isinstance(topic, str) else None


def broker_config(
    verifier: Verifier,
    *,
    host: str = "127.0.0.1",
    port: int = 1883,
    audience: str | None = None,
) -> dict[str, Any]:
    """Return an amqtt broker config with one TCP listener and only this plugin for logins.

    ``audience`` is this broker's URL, which every password's ``aud`` must then equal.
    """
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            PLUGIN_PATH: {"verifier": verifier, "audience": audience},
            TOPIC_PLUGIN_PATH: {"verifier": verifier},
        },
    }
