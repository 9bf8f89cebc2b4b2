"""The engine inside other training stacks: ``transformers`` (the Hugging Face Trainer)."""
