"""Where the library meets Cog: the training service behind train.py (service_train), the local
Cog server and client that `make` runs without Docker (cogtools), and `make demo` (demo)."""
