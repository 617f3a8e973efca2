"""The ``device-sdk`` command. Thin: it parses arguments, calls the library and prints."""
