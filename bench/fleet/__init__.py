"""Several replicas on one machine: drains and routing across them."""
