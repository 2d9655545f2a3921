"""Feature explanations and detection judging: Anthropic models or offline statistics."""
