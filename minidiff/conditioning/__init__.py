"""Text-to-image and class conditioning, beside the core path (article sections 2.3 and 3.3): the tokenizer and text
encoder (text), the prompt templates (prompts), and the conditional U-Nets (unet)."""
