"""Files that come in and go out in other formats: untrusted archives (archives) and the weights
strings that bring them, folders, URLs and data: URIs (weights_sources), Meta checkpoints read into
Hugging Face folders (convert_meta), and merged exports to Hugging Face, Meta and GGUF (export,
export_stream, export_llama)."""
