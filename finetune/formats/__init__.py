"""Files that come in and go out in other formats: untrusted archives and URLs (archives), Meta
checkpoints read into Hugging Face folders (convert_meta), and merged exports to Hugging Face,
Meta and GGUF (export, export_stream, export_llama)."""
