"""The OpenAI-compatible HTTP front: routes, request bodies in, responses and stream chunks out."""
