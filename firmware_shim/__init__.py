"""Firmware that exposes a secure element over a serial link, and its host-side simulator.

The board runs __init__.py, protocol.py, device.py, atecc608.py and main.py under MicroPython.
software_se.py and simulator.py are host only and need CPython with ``cryptography``.
docs/firmware-protocol.md specifies the link protocol.
"""
