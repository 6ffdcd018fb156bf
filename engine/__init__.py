"""The inference engine: scheduling, batching and the model runner."""
