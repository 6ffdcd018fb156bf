"""The step loop's state: inbox, scheduler and sequences, KV blocks, a step's values, output processing."""
