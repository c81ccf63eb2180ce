"""Results to destinations: dispatch, C-STORE (SCU) and STOW-RS senders."""
