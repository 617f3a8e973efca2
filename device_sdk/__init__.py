"""device-sdk: a hardware-held device identity that logs in to MQTT and HTTP backends.

The private key lives in a PKCS#11 token, a TPM 2.0 or a serial secure element. The device signs
fresh, single-use server challenges with it, so no static secret exists to extract or replay.
"""

__version__ = "0.1.0"
