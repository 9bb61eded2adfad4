"""The data path before any model: a dataset file read (dataset_file) into checked records and
split (records), the prompt templates and their rendering (prompts, templates/), records to token
ids with the loss mask (encoding), and token ids to micro-batches (batching)."""
