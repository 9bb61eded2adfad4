"""The prediction service behind predict.py: one resident base model (server), the per-request adapters
it keeps loaded (adapter_cache) and the one thread every torch call of it runs on (compute_thread)."""
