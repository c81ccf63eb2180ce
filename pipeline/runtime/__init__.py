"""Running it all on one machine: `up`'s supervision, the embedded Redis and Triton."""
