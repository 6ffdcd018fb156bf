"""Who may call and what they may see: keys, TLS, Host checks, per-tenant cache partitions, reloads."""
