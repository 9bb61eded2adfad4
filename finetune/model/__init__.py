"""The model: where base weights come from (weights), loading the base and tokenizer and attaching or
loading a LoRA (loading), what a served adapter's config may be (adapter_limits), the adapter folder a
training writes (adapter_folder), and the device everything runs on (devices)."""
