"""What operators use: status, the status page, metrics, retention, failed items,
route explanation."""
